"""Object storage (folder or S3), the versioned concept registry, and base models kept in S3.
Imports the engine (file formats, names), never jobs, serving or the CLI."""
