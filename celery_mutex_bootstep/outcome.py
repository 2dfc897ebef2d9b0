"""The three answers an acquisition can get."""

__all__ = ('LeaseOutcome',)


class LeaseOutcome:
    ACQUIRED = 'acquired'
    CONTENDED = 'contended'
    UNAVAILABLE = 'unavailable'
