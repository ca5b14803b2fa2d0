"""User-facing errors: the CLI prints them as one line (``promo: error: ...``) and exits non-zero."""


class PromoError(Exception):
    """An error with a message fit for the user: what happened, to which input, what to do."""
