"""Bulk concept jobs: the manifest, the Ray Train run of each concept, and submission, status and
cancellation through the Ray Jobs API, Ray Client or an embedded local Ray."""
