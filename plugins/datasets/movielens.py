"""MovieLens readers (GroupLens): the official ml-100k, ml-1m and CSV (ml-latest, ml-20m, ml-25m) files.

Every rating counts as an implicit positive interaction. Files are found under the data folder in a folder
named like ``movielens-1m/`` or the official ``ml-1m/``, plain or gzip-compressed; when they are missing,
the official zip is downloaded into the data folder and checked against its recorded size and SHA-256.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from embbench import BagSource, DataNotFound, Dataset, download_archive, find_file, read_table

_GROUPLENS = "https://files.grouplens.org/datasets/movielens"
_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class OfficialArchive:
    """A GroupLens zip and the size and SHA-256 a download must have before it is extracted."""

    url: str
    size_bytes: int
    sha256: str


# Sizes and SHA-256 as TensorFlow Datasets records them (tensorflow_datasets/url_checksums/movielens.txt).
# ml-latest.zip is absent: GroupLens replaces it in place, so no checksum of it stays true; it is not downloaded.
ARCHIVES: dict[str, OfficialArchive] = {
    "ml-100k": OfficialArchive(
        f"{_GROUPLENS}/ml-100k.zip", 4_924_029, "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
    ),
    "ml-1m": OfficialArchive(
        f"{_GROUPLENS}/ml-1m.zip", 5_917_549, "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"
    ),
    "ml-latest-small": OfficialArchive(
        f"{_GROUPLENS}/ml-latest-small.zip", 978_202,
        "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
    ),
    "ml-20m": OfficialArchive(
        f"{_GROUPLENS}/ml-20m.zip", 198_702_078, "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3"
    ),
    "ml-25m": OfficialArchive(
        f"{_GROUPLENS}/ml-25m.zip", 261_978_986, "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa"
    ),
}


def _content_sha256(path: Path) -> str:
    """sha256 of the uncompressed bytes, so a file and its .gz have the same fingerprint."""
    digest = hashlib.sha256()
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _MovieLensFiles(Dataset):
    """One ratings file found in ``folders`` of the data folder, downloaded from ``archive`` if absent.

    ``folders`` is (ours, official); the official folder name keys :data:`ARCHIVES`. Without a recorded
    archive nothing is downloaded.
    """

    ratings_file: ClassVar[str]

    def __init__(
        self,
        data_dir: str | Path | None,
        *,
        title: str,
        folders: tuple[str, str],
        **params: str,
    ) -> None:
        super().__init__(data_dir, **params)
        self.title = title
        self.folders = folders
        self.archive: OfficialArchive | None = ARCHIVES.get(folders[1])
        self._path: Path | None = None
        self._fingerprint: str | None = None

    def ratings_path(self) -> Path:
        """The ratings file, downloaded first if it is not in the data folder."""
        if self._path is None:
            path = find_file(self.data_dir, self.folders, [self.ratings_file])
            if path is None:
                url = self._download()
                path = find_file(self.data_dir, self.folders, [self.ratings_file])
            if path is None:
                raise DataNotFound(
                    f"{url} holds no {self.folders[1]}/{self.ratings_file}; "
                    f"put {self.ratings_file} in {self.data_dir / self.folders[0]}/ (see docs/datasets.md)"
                )
            self._path = path
        return self._path

    def _download(self) -> str:
        """Download and extract the official archive, verified; returns its URL."""
        what = f"{self.title} ({self.ratings_file}, in {self.folders[0]}/ or {self.folders[1]}/)"
        if self.archive is None:
            raise DataNotFound(
                f"{what} is not in {self.data_dir}/ and is not downloaded (GroupLens replaces "
                f"{_GROUPLENS}/{self.folders[1]}.zip in place, so no checksum of it can be recorded); "
                f"download it by hand and unzip it into {self.data_dir}/ (see docs/datasets.md)"
            )
        archive = self.archive
        download_archive(archive.url, self.data_dir, what, size_bytes=archive.size_bytes, sha256=archive.sha256)
        return archive.url

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            path = self.ratings_path()
            try:
                self._fingerprint = _content_sha256(path)
            except (OSError, EOFError) as exc:  # a corrupt or truncated .gz
                raise self._unreadable(path, exc) from None
        return self._fingerprint

    def _unreadable(self, path: Path, reason: Exception) -> DataNotFound:
        detail = " ".join(str(reason).split()) or type(reason).__name__
        return DataNotFound(
            f"could not read {path} as {self.title} {self.ratings_file} ({detail}); "
            f"replace it with the official file (see docs/datasets.md)"
        )

    def read_ratings(self, **read_csv_kwargs: Any) -> pd.DataFrame:
        """The ratings file through ``pandas.read_csv``; an unreadable file is one clear error."""
        path = self.ratings_path()
        try:
            return read_table(path, **read_csv_kwargs)
        except (OSError, EOFError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise self._unreadable(path, exc) from None


    def read_items(self, name: str, **read_csv_kwargs: Any) -> pd.DataFrame | None:
        """The movie file ``name`` beside the ratings, or None when it is absent (side features are optional)."""
        self.ratings_path()  # downloads the archive, which holds the movie file too, if the ratings are missing
        path = find_file(self.data_dir, self.folders, [name])
        if path is None:
            return None
        try:
            return read_table(path, **read_csv_kwargs)
        except (OSError, EOFError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise self._unreadable(path, exc) from None

    def bag_features(self) -> dict[str, BagSource]:
        """``genres``: each movie's genres, a bag of genre IDs (the columns of its side features, in order)."""
        side = self.item_side_features()
        return {} if side is None else {"genres": BagSource.from_multi_hot("item", side)}


def genre_multi_hot(items: pd.Series, genres: pd.Series) -> pd.DataFrame:
    """One 0/1 float column per genre, indexed by item ID, from '|'-separated genre strings."""
    dummies = genres.fillna("").str.get_dummies(sep="|").drop(columns=["(no genres listed)"], errors="ignore")
    dummies.index = items.to_numpy(dtype=np.int64)
    return dummies.sort_index(axis=1).astype(np.float32)


class MovieLens100K(_MovieLensFiles):
    """MovieLens 100K: 100,000 ratings of 1,682 movies by 943 users (official ml-100k u.data)."""

    summary = "MovieLens 100K (GroupLens): 100,000 ratings, 943 users, 1,682 movies; official ml-100k files"
    ratings_file = "u.data"

    def __init__(self, data_dir: str | Path | None = None) -> None:
        super().__init__(
            data_dir, title="MovieLens 100K", folders=("movielens-100k", "ml-100k"),
        )

    def load(self) -> pd.DataFrame:
        # user id \t item id \t rating \t timestamp, no header
        return self.read_ratings(
            sep="\t", header=None, names=["user", "item", "rating", "timestamp"],
            dtype=np.int64,
        )

    def item_side_features(self) -> pd.DataFrame | None:
        """The 19 genre flags of u.item (movie id | title | dates | URL | 19 flags), by movie ID."""
        movies = self.read_items("u.item", sep="|", header=None, encoding="latin-1")
        if movies is None:
            return None
        flags = movies.iloc[:, -19:].astype(np.float32)
        flags.index = movies.iloc[:, 0].to_numpy(dtype=np.int64)
        flags.columns = [f"genre_{i}" for i in range(19)]
        return flags


class MovieLens1M(_MovieLensFiles):
    """MovieLens 1M: 1,000,209 ratings of 3,706 movies by 6,040 users (official ml-1m ratings.dat)."""

    summary = "MovieLens 1M (GroupLens): 1,000,209 ratings, 6,040 users, 3,706 movies; official ml-1m files"
    ratings_file = "ratings.dat"

    def __init__(self, data_dir: str | Path | None = None) -> None:
        super().__init__(
            data_dir, title="MovieLens 1M", folders=("movielens-1m", "ml-1m"),
        )

    def load(self) -> pd.DataFrame:
        # UserID::MovieID::Rating::Timestamp. pandas' C parser takes only one-character separators, so split
        # on ':' and keep every other field (the empty fields between the two colons are dropped).
        frame = self.read_ratings(
            sep=":", header=None, usecols=[0, 2, 4, 6], dtype=np.int64,
        )
        frame.columns = ["user", "item", "rating", "timestamp"]
        return frame

    def item_side_features(self) -> pd.DataFrame | None:
        """Genres of movies.dat (MovieID::Title::Genres, latin-1) as multi-hot flags, by movie ID."""
        movies = self.read_items("movies.dat", sep="\t", header=None, names=["line"], encoding="latin-1")
        if movies is None:
            return None
        fields = movies["line"].str.split("::", n=2, expand=True)
        return genre_multi_hot(fields[0].astype(np.int64), fields[2])


class MovieLensLatest(_MovieLensFiles):
    """MovieLens in the CSV layout (ratings.csv): ml-latest-small, ml-latest, ml-20m or ml-25m."""

    summary = "MovieLens CSV releases (GroupLens): ml-latest-small, ml-latest, ml-20m, ml-25m"
    ratings_file = "ratings.csv"
    variants: ClassVar[tuple[str, ...]] = ("latest-small", "latest", "20m", "25m")

    def __init__(self, data_dir: str | Path | None = None, variant: str = "latest-small") -> None:
        if variant not in self.variants:
            allowed = ", ".join(f"'{v}'" for v in self.variants)
            raise ValueError(f"variant must be one of {allowed}, got {variant!r}")
        super().__init__(
            data_dir, title=f"MovieLens {variant}", folders=(f"movielens-{variant}", f"ml-{variant}"),
            variant=variant,
        )
        self.variant = variant

    def load(self) -> pd.DataFrame:
        # userId,movieId,rating,timestamp with a header; ratings are 0.5 to 5.0 stars
        frame = self.read_ratings(
            usecols=["userId", "movieId", "rating", "timestamp"],
            dtype={"userId": np.int64, "movieId": np.int64, "rating": np.float32, "timestamp": np.int64},
        )
        frame = frame.rename(columns={"userId": "user", "movieId": "item"})
        return frame[["user", "item", "rating", "timestamp"]]

    def item_side_features(self) -> pd.DataFrame | None:
        """Genres of movies.csv (movieId,title,genres) as multi-hot flags, by movie ID."""
        movies = self.read_items("movies.csv", usecols=["movieId", "genres"])
        return None if movies is None else genre_multi_hot(movies["movieId"], movies["genres"])
