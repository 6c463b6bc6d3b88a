"""djinn-worker: the build worker of Djinn CI."""

__version__ = "0.1.0"
