"""Who may use a job: client identities (encrypted-session signers, HTTP job tokens) and the
``--session-auth`` rules that bind jobs to them. The token functions need the crypto libraries
and load them on first use: ``from sidecar.auth.tokens import make_job_token``."""

from sidecar.auth.binding import MODES, Requester, SessionAuth, TokenScope

__all__ = ["MODES", "Requester", "SessionAuth", "TokenScope"]
