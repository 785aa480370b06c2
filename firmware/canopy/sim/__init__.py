"""Unix-port-only simulation: I2C bus, BME280, actuators and microclimate."""
