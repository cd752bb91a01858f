"""Downstream access to the catalogs a run wrote: open them with LSDB and cone-search them."""

from catalogs.access import cone_search, open_run

__all__ = ["cone_search", "open_run"]
