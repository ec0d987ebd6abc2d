"""edgeagent: licence-plate reads over MQTT, journaled in SQLite, delivered to WeChat Pay."""

__version__ = "0.1.0"
