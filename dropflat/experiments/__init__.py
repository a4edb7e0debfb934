"""Experiments: end-to-end measurements that write a report (``dropflat demo``)."""
