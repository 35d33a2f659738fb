"""Serving: the pieces that answer a user in milliseconds (issue 10, in progress). Today: the item index."""
