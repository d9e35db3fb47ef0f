"""Git remote URLs without credentials: what a `CodeRef.repo_url` may carry.

A remote cloned with a token (`https://x-access-token:ghp_...@github.com/org/repo.git`,
`https://oauth2:glpat-...@gitlab.com/...`, `https://ghp_...@github.com/...`) has that token in
`remote.origin.url`. The URL is recorded with each run: it reaches the coordinator's database, the job's
`REPO_URL`, its logs and `dstack ps --json`. Both sides strip it: the CLI before it sends a code ref, the
coordinator when it reads one (an older or hostile client may still send a token).

The rules:
- http(s), ftp(s) and any other scheme without a user part of its own (`git://`, `file://`): the whole
  userinfo goes, user included. With a token-only URL the "user" is the token, and a user name is never
  needed to fetch; the query and fragment go too (`?private_token=...`), as git needs neither.
- ssh (`ssh://`, `git+ssh://`, `ssh+git://`): the user stays (`ssh://git@host/...` names the account,
  and the key authenticates); a password (`ssh://user:pw@host/...`) goes.
- scp-style `[user@]host:path` (`git@github.com:org/repo.git`): the same as ssh; `user:pw@host:path`
  loses the password.
- Anything else (a local path, an empty string) is returned as it came.
"""

from __future__ import annotations

import re

_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<path>[^?#]*)(?P<rest>.*)", re.S)
# scp-style: no "://", a host (or [IPv6]) before the first ':', which comes before any '/'.
_SCP = re.compile(r"(?:(?P<userinfo>[^/]*)@)?(?P<host>\[[^\]/]*\]|[^/:\[\]@]+):(?P<path>.*)", re.S)
_SSH_SCHEMES = {"ssh", "git+ssh", "ssh+git"}


def _user_only(userinfo: str) -> str:
    """The user of `user[:password]`, with the '@' that follows it; '' when nothing is kept."""
    user = userinfo.split(":", 1)[0]
    return f"{user}@" if user else ""


def public_repo_url(url: str) -> str:
    """`url` without the secrets a git remote URL may carry (see the module's rules)."""
    url = url.strip()
    m = _URL.fullmatch(url)
    if m is not None:
        scheme, authority = m["scheme"], m["authority"]
        # The host part follows the last '@': a password may hold an unescaped '@'.
        userinfo, at, hostport = authority.rpartition("@")
        if scheme.lower() in _SSH_SCHEMES:
            keep = _user_only(userinfo) if at else ""
            return f"{scheme}://{keep}{hostport}{m['path']}{m['rest']}"
        return f"{scheme}://{hostport}{m['path']}"
    if "://" not in url and not url.startswith(("/", ".", "~")):
        s = _SCP.fullmatch(url)
        if s is not None and len(s["host"]) > 1:  # "C:\\repo" is a Windows path, not host "C"
            keep = _user_only(s["userinfo"]) if s["userinfo"] is not None else ""
            return f"{keep}{s['host']}:{s['path']}"
    return url
