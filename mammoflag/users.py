"""``mammoflag users``: annotators join Label Studio through the organization's invitation link.

Label Studio Community cannot set a password through its API, and mammoflag never chooses,
prints or logs one: ``users add EMAIL`` prints the invitation link for that person, who signs
up with their own password. Signup without the link stays off
(``LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true``, set by ``mammoflag up`` and the tests).
``--new-link`` resets the link first, so an old one that went astray stops working.
``users list`` shows who has joined (id, email) — the ids ``MAMMOFLAG_ADJUDICATORS`` may name.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from urllib.parse import urlsplit

from mammoflag.settings import Settings


@dataclass(frozen=True)
class Invitation:
    email: str
    link: str  # the signup URL with the organization's invitation token
    existing_user_id: int | None  # already a member: nothing to do
    loopback_only: bool  # the URL names this machine only (mammoflag up without --host)

    def as_text(self) -> str:
        if self.existing_user_id is not None:
            return f"{self.email} is already a member (user id {self.existing_user_id})"
        lines = [f"Send {self.email} this link; they sign up there with that address and a password of their own:",
                 f"  {self.link}"]
        if self.loopback_only:
            lines.append("  (this URL works only on this machine: start the platform with `mammoflag up --host ADDR` "
                         "and pass --url http://ADDR:PORT for other machines' browsers)")
        return "\n".join(lines)


@dataclass(frozen=True)
class Member:
    id: int
    email: str
    last_activity: str


def invitation(client, base_url: str, email: str, new_link: bool = False) -> Invitation:
    email = email.strip()
    if "@" not in email or any(ch.isspace() for ch in email):
        raise ValueError(f"not an email address: {email!r}")
    existing = next((u for u in client.users.list() if str(u.email or "").lower() == email.lower()), None)
    host = urlsplit(base_url).hostname or ""
    loopback = host in ("127.0.0.1", "localhost", "::1")
    if existing is not None:
        return Invitation(email, "", int(existing.id), loopback)
    invite = client.organizations.reset_token() if new_link else client.organizations.invites.get_invite_link()
    return Invitation(email, base_url.rstrip("/") + str(invite.invite_url), None, loopback)


def members(client) -> list[Member]:
    return sorted((Member(int(u.id), str(u.email or ""), str(getattr(u, "last_activity", "") or ""))
                   for u in client.users.list()), key=lambda m: m.id)


def cmd_add(args: argparse.Namespace, settings: Settings) -> int:
    from mammoflag.labelstudio import connect

    print(invitation(connect(settings), args.url or settings.label_studio_url, args.email, args.new_link).as_text())
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:  # noqa: ARG001
    from mammoflag.labelstudio import connect

    adjudicators = settings.adjudicators
    for m in members(connect(settings)):
        role = " (adjudicator)" if str(m.id) in adjudicators or m.email.lower() in adjudicators else ""
        print(f"{m.id}\t{m.email}{role}\t{m.last_activity}")
    return 0


def register(sub) -> None:
    users = sub.add_parser("users", help="annotators: invite one (users add EMAIL), list members")
    verbs = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = verbs.add_parser("add", help="print the invitation link for EMAIL (no password is ever set or printed)")
    add.add_argument("email", metavar="EMAIL")
    add.add_argument("--new-link", action="store_true", help="reset the invitation link first (old links stop working)")
    add.add_argument("--url", default=None, help="Label Studio's URL as annotators reach it (default: "
                                                 "MAMMOFLAG_LABEL_STUDIO_URL)")
    add.set_defaults(func=cmd_add)
    ls = verbs.add_parser("list", help="members of the organization: id, email, last activity")
    ls.set_defaults(func=cmd_list)
