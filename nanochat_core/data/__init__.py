"""Data that ships with the package: dataset sources, the bundled public-domain corpus, local chat data."""
