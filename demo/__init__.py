"""The demo and its synthetic data: recipes beside the library, installed as `aki_demo`."""
