"""dstack: the one top-level import name an installed dstack adds.

The repository keeps its parts as top-level folders (`cli/`, `coordinator/`, `agent/`, `storage/`, `protos/`);
`dstack/` holds a symbolic link to each, so that `dstack.cli`, `dstack.coordinator`, ... import the same from a
checkout as from an installed wheel, and no other distribution's `cli` or `agent` can shadow ours (or ours theirs).
"""
