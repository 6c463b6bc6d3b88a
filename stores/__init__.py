"""Stores: where artifacts, objects and images live on the worker's disk."""

from .file import FileStore, Stored, StoreError

__all__ = ["FileStore", "Stored", "StoreError"]
