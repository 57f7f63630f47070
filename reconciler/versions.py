"""The contract's version rules: may an incoming record replace the stored desired state?

Pure, so each rule has a test of its own. The caller reads the stored desired state under a
row lock, asks `judge`, and then writes, ignores, or sends the record to the DLQ.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from streams.configs import MAX_VERSION


class Verdict(enum.Enum):
    APPLY = "apply"
    IGNORE = "ignore"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class StoredDesired:
    version: int | None
    deleted: bool
    # Normalised content (see streams.configs.Config.normalised), None after a delete.
    normalised: dict | None


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    # Why a record is ignored or rejected, in words a person can act on.
    why: str | None = None


def judge_config(
    *, stored: StoredDesired | None, version: int | None, normalised: dict
) -> Judgement:
    if stored is None or stored.version is None:
        return Judgement(Verdict.APPLY)

    if version is None:
        return Judgement(
            Verdict.REJECT,
            f"the config has carried version {stored.version}; a record without a version is "
            + (f"refused (publish it with a version above {stored.version})"
               if stored.version < MAX_VERSION else
               "refused, and no version can be higher: this config cannot change again "
               "under its id; publish the change under a new id"),
        )
    if version < stored.version:
        return Judgement(
            Verdict.IGNORE, f"version {version} is older than the applied version {stored.version}"
        )
    if version == stored.version:
        if stored.deleted:
            return Judgement(
                Verdict.IGNORE,
                f"version {version} is not above the version {stored.version} of the delete",
            )
        if stored.normalised == normalised:
            return Judgement(Verdict.IGNORE, f"version {version} is already applied")
        if version == MAX_VERSION:
            return Judgement(
                Verdict.REJECT,
                f"version {version} is already applied with different content, and no "
                "version can be higher: this config cannot change again under its id; "
                "publish the change under a new id",
            )
        return Judgement(
            Verdict.REJECT,
            f"version {version} is already applied with different content; publish the change "
            f"with version {version + 1} or higher",
        )
    return Judgement(Verdict.APPLY)


def judge_tombstone(*, stored: StoredDesired | None) -> Judgement:
    if stored is not None and stored.deleted:
        return Judgement(Verdict.IGNORE, "the config is already deleted")
    return Judgement(Verdict.APPLY)
