"""Released migrations are never edited: their checksums are pinned here.

A database that applied a migration records its checksum, and ``migrate up`` refuses to
run when a shipped file no longer matches (see ``Migrator``). That protects one database
at a time, after the fact; this test stops the edit before it ships (Synapse checks its
schema deltas the same way). To change the schema, add a new numbered file. A new file is
pinned by adding the line this test prints to ``RELEASED``, in the same commit.
"""

from __future__ import annotations

from typing import Final

from chatkeep.storage.migrate import load_migrations

RELEASED: Final[dict[int, tuple[str, str]]] = {
    1: ("create_users", "3bab5f19a79602a7a6df24c3622295efccb613b2ea58cb0486ddca4c67415127"),
    2: ("create_rooms", "ed7856982cda93bf01507fcf56bfa9c13d4c23691c8a4ba0e769fcbc3a84d112"),
    3: ("create_messages", "2c2f0322f851c87b4dde3a945757eb05247c6a3ff4a4d720481e4f6f6b711588"),
    4: ("create_room_users", "1b7afe62018e4de8e78295e94de15cab4c9f4d62a338bf5ab8141b1e0506bf9c"),
    5: (
        "create_message_read_status",
        "42b3a8102b3d294d018c600fe21a7c602fab49ac5bf3cd9fb51bfb1a11666803",
    ),
    6: ("create_indexes", "e8723d90a3fd03473ef12269186d90872bc746e919b7b7fd829a600e9cb046ef"),
    7: ("create_triggers", "91a95a48fc2d681b06ff16b6f473b041fe691fd0d75f3e55a4d8011dbc058023"),
    8: (
        "grant_role_privileges",
        "d1e500b2c9a3169addfe73fde4a07f3c2ef64acf59cadc28c9e9d0b887022055",
    ),
    9: ("row_level_security", "f934463f825b84ef075ff50ae1a539c129c5defed12661cc011a1eafd2a723b4"),
    10: ("create_audit_log", "44dc58c0594bc5735e23f358065caed40f84232c92f54e21fa1654f2f41f2caa"),
    11: (
        "least_privilege_for_the_app",
        "00c1eaa0cab23832807dc60a1991d53525de50d214dc96948bbe7636183a9ec9",
    ),
    12: ("room_change_log", "1d6ce9d6445e51a736c1e09932408068aba88cd15aa640d0ea2fa12a23ff04a9"),
    13: (
        "flows_in_one_round_trip",
        "59828e4edca805ad563a2aaeb4817d2871db890f561687c7c6f28fdffd8254c2",
    ),
    14: (
        "send_in_one_round_trip",
        "c68e4bbb6c9bf93253f7d165ec66a8f9411c37b42e8d713655a500dcff0e900c",
    ),
    15: (
        "threads_and_mentions",
        "225dec146ace41803971bc30de484bf264b318d5a41d3855ff046df2b222a821",
    ),
    16: (
        "message_search",
        "71eef86872240c769741e740eae6e4b3cbcd9fa81bfde442283d8a015e87ff9e",
    ),
    17: (
        "history_reads_without_replanning",
        "e1537d6a2b922c59d894dc38f73878be1c90fbc75505692942a0eb9bc8516614",
    ),
    18: (
        "write_flows_in_one_round_trip",
        "40a18dd5ac7e3743eb50f2d5c5c459d18127571ae5a42cff2d12fa3ed42f8b3e",
    ),
    20: (
        "stored_badge_counters",
        "d33550bdfd6afbc03d1ea31e3503302fbc729140793bb8e8bae35a2a572bdf30",
    ),
    21: (
        "mention_notices_and_collapsed_index",
        "a0f7dcf0020a2c8e7804e1df2d68b8450d31ae8f75d83776897453e88d499a85",
    ),
    22: (
        "membership_flows_in_one_round_trip",
        "9b967987e43fda4dda84d9894f33341433d361eda8d716fe977f0cc7f5dc4400",
    ),
    23: (
        "threads_on_citus",
        "9e58ff6d393f361de4d6c2dde95f842eddcfef81e646b871ce0583d297f4fe47",
    ),
}


def test_released_migrations_are_unchanged() -> None:
    shipped = {m.version: m for m in load_migrations()}
    for version, (name, pinned) in RELEASED.items():
        assert version in shipped, f"released migration {version:03d}_{name} was removed"
        migration = shipped[version]
        assert migration.name == name, f"released migration {version:03d} was renamed"
        assert migration.checksum == pinned, (
            f"{migration.label} was edited after release: its checksum is now "
            f"{migration.checksum}. Restore the file and put the change in a new migration."
        )


def test_every_shipped_migration_is_pinned() -> None:
    unpinned = [m for m in load_migrations() if m.version not in RELEASED]
    lines = [f'    {m.version}: ("{m.name}", "{m.checksum}"),' for m in unpinned]
    assert not unpinned, "pin the new migration(s) in RELEASED:\n" + "\n".join(lines)
