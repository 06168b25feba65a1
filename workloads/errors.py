"""The one error type workload loading raises."""

from __future__ import annotations


class WorkloadError(ValueError):
    """A workload that cannot be loaded: bad path, malformed record, unknown name or topic.

    A ValueError so grid validation can treat it like any other bad value; the message names
    the file (and line) so the user can fix the data without reading our code.
    """
