"""Kept for tools that still call setup.py directly; setup.cfg holds the metadata."""
from setuptools import setup

setup()
