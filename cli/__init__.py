"""The user's side: workflow files, providers, code packing, and the `dstack` commands."""
