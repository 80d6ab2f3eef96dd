"""An example embbench scheme plugin: row = ID mod m."""
