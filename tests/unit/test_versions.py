"""The contract's "Versions" paragraph, one rule per test."""

from __future__ import annotations

from reconciler.versions import StoredDesired, Verdict, judge_config, judge_tombstone
from streams.configs import MAX_VERSION

CONTENT = {"id": "shop-42.sku-7", "enabled": True, "interval_seconds": 5.0}
OTHER_CONTENT = {"id": "shop-42.sku-7", "enabled": True, "interval_seconds": 10.0}


def live(version: int | None, normalised: dict = CONTENT) -> StoredDesired:
    return StoredDesired(version=version, deleted=False, normalised=normalised)


def deleted(version: int | None) -> StoredDesired:
    return StoredDesired(version=version, deleted=True, normalised=None)


def test_a_version_lower_than_the_applied_one_is_ignored():
    judgement = judge_config(stored=live(5), version=4, normalised=OTHER_CONTENT)

    assert judgement.verdict is Verdict.IGNORE


def test_a_higher_version_is_applied():
    judgement = judge_config(stored=live(5), version=6, normalised=OTHER_CONTENT)

    assert judgement.verdict is Verdict.APPLY


def test_the_applied_version_again_with_the_same_normalised_content_is_ignored():
    same_content_other_key_order = dict(reversed(list(CONTENT.items())))

    judgement = judge_config(
        stored=live(5), version=5, normalised=same_content_other_key_order
    )

    assert judgement.verdict is Verdict.IGNORE


def test_the_applied_version_again_with_different_content_is_rejected_naming_the_version():
    judgement = judge_config(stored=live(5), version=5, normalised=OTHER_CONTENT)

    assert judgement.verdict is Verdict.REJECT
    assert "version 5" in judgement.why


def test_at_the_highest_version_a_change_is_rejected_without_asking_for_a_higher_one():
    for version in (MAX_VERSION, None):
        judgement = judge_config(stored=live(MAX_VERSION), version=version,
                                 normalised=OTHER_CONTENT)

        assert judgement.verdict is Verdict.REJECT
        assert str(MAX_VERSION + 1) not in judgement.why
        assert "above" not in judgement.why
        assert "cannot change again under its id" in judgement.why


def test_a_tombstone_keeps_the_version_so_a_record_at_or_below_it_does_not_bring_the_config_back():
    for version in [5, 4, 1]:
        judgement = judge_config(stored=deleted(5), version=version, normalised=CONTENT)

        assert judgement.verdict is Verdict.IGNORE, version


def test_a_deleted_config_is_recreated_by_a_record_with_a_higher_version():
    judgement = judge_config(stored=deleted(5), version=6, normalised=CONTENT)

    assert judgement.verdict is Verdict.APPLY


def test_once_a_config_has_carried_a_version_a_record_without_one_is_rejected():
    judgement = judge_config(stored=live(5), version=None, normalised=CONTENT)

    assert judgement.verdict is Verdict.REJECT
    assert "5" in judgement.why


def test_a_deleted_versioned_config_is_not_recreated_by_a_record_without_a_version():
    judgement = judge_config(stored=deleted(5), version=None, normalised=CONTENT)

    assert judgement.verdict is Verdict.REJECT


def test_without_versions_every_record_applies_in_partition_order():
    first = judge_config(stored=None, version=None, normalised=CONTENT)
    changed = judge_config(stored=live(None), version=None, normalised=OTHER_CONTENT)
    repeated = judge_config(stored=live(None), version=None, normalised=CONTENT)
    after_delete = judge_config(stored=deleted(None), version=None, normalised=CONTENT)

    assert [first.verdict, changed.verdict, repeated.verdict, after_delete.verdict] == [
        Verdict.APPLY
    ] * 4


def test_a_versioned_record_applies_over_an_unversioned_stored_config():
    judgement = judge_config(stored=live(None), version=1, normalised=OTHER_CONTENT)

    assert judgement.verdict is Verdict.APPLY


def test_the_first_record_of_a_config_applies_whatever_its_version():
    judgement = judge_config(stored=None, version=7, normalised=CONTENT)

    assert judgement.verdict is Verdict.APPLY


def test_a_tombstone_of_an_already_deleted_config_is_ignored():
    judgement = judge_tombstone(stored=deleted(5))

    assert judgement.verdict is Verdict.IGNORE


def test_a_tombstone_of_an_unknown_config_is_applied():
    judgement = judge_tombstone(stored=None)

    assert judgement.verdict is Verdict.APPLY


def test_a_tombstone_of_a_live_config_is_applied():
    judgement = judge_tombstone(stored=live(5))

    assert judgement.verdict is Verdict.APPLY
