"""The emulator's added API-server semantics: resourceVersions, preconditions, tripwires.

These are what make a warm-pool claim atomic; if the emulator let a stale write through, the
race tests in test_warm_pool.py would prove nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import kmock
import pytest
from emulator import Emulator
from kube_sim import PATIENCE, eventually

BASE = "/apis/ray.io/v1/namespaces/ns/rayclusters"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSONPATCH = {"Content-Type": "application/json-patch+json"}


@pytest.fixture()
async def api() -> AsyncIterator[Emulator]:
    async with Emulator() as emulator, kmock.Server(emulator):
        emulator.resources["ray.io/v1/rayclusters"] = {"namespaced": True, "kind": "RayCluster"}
        yield emulator
        emulator.release_all()


async def _create(api: Emulator, name: str = "c1", **meta: object) -> dict:
    body = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name, **meta}}
    async with api.post(BASE, json=body) as resp:
        assert resp.status == 201, await resp.text()  # Created, as the API server answers
        return await resp.json()


async def _patch(api: Emulator, body: object, headers: dict = MERGE, name: str = "c1"):
    async with api.patch(f"{BASE}/{name}", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_create_stamps_version_uid_and_time(api: Emulator) -> None:
    obj = await _create(api)
    meta = obj["metadata"]
    assert meta["resourceVersion"].isdigit()
    assert len(meta["uid"]) == 36
    assert meta["creationTimestamp"].endswith("Z")


async def test_every_write_gets_a_newer_version(api: Emulator) -> None:
    first = (await _create(api))["metadata"]["resourceVersion"]
    status, second = await _patch(api, {"metadata": {"labels": {"a": "1"}}})
    assert status == 200
    assert int(second["metadata"]["resourceVersion"]) > int(first)
    stored = api.objects["ray.io/v1/rayclusters", "ns", "c1"]
    assert stored["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]
    assert stored["metadata"]["labels"] == {"a": "1"}


async def test_patch_with_current_version_succeeds(api: Emulator) -> None:
    version = (await _create(api))["metadata"]["resourceVersion"]
    status, obj = await _patch(
        api, {"metadata": {"resourceVersion": version, "labels": {"a": "1"}}}
    )
    assert status == 200
    assert obj["metadata"]["labels"] == {"a": "1"}
    assert obj["metadata"]["resourceVersion"] != version


async def test_patch_with_stale_version_is_a_conflict_and_changes_nothing(api: Emulator) -> None:
    stale = (await _create(api))["metadata"]["resourceVersion"]
    await _patch(api, {"metadata": {"labels": {"a": "1"}}})
    status, error = await _patch(
        api, {"metadata": {"resourceVersion": stale, "labels": {"a": "2"}}}
    )
    assert status == 409
    assert error["reason"] == "Conflict"
    assert api.objects["ray.io/v1/rayclusters", "ns", "c1"]["metadata"]["labels"] == {"a": "1"}


async def test_two_racing_writers_with_one_version_only_one_wins(api: Emulator) -> None:
    version = (await _create(api))["metadata"]["resourceVersion"]
    results = await asyncio.gather(
        *(
            _patch(api, {"metadata": {"resourceVersion": version, "labels": {"owner": who}}})
            for who in ("a", "b", "c", "d")
        )
    )
    statuses = sorted(status for status, _ in results)
    assert statuses == [200, 409, 409, 409]
    winner = next(obj for status, obj in results if status == 200)
    stored = api.objects["ray.io/v1/rayclusters", "ns", "c1"]["metadata"]["labels"]
    assert stored == winner["metadata"]["labels"]


async def test_json_patch_failed_test_op_is_422_and_changes_nothing(api: Emulator) -> None:
    await _create(api)
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
        {"op": "add", "path": "/metadata/labels", "value": {"a": "1"}},
    ]
    status, _ = await _patch(api, ops, headers=JSONPATCH)
    assert status == 422
    assert "labels" not in api.objects["ray.io/v1/rayclusters", "ns", "c1"]["metadata"]


async def test_json_patch_with_current_version_applies_and_bumps(api: Emulator) -> None:
    version = (await _create(api))["metadata"]["resourceVersion"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": version},
        {"op": "add", "path": "/metadata/labels", "value": {"a": "1"}},
    ]
    status, obj = await _patch(api, ops, headers=JSONPATCH)
    assert status == 200
    assert obj["metadata"]["labels"] == {"a": "1"}
    assert int(obj["metadata"]["resourceVersion"]) > int(version)


async def test_delete_with_stale_precondition_is_a_conflict(api: Emulator) -> None:
    stale = (await _create(api))["metadata"]["resourceVersion"]
    await _patch(api, {"metadata": {"labels": {"claimed": "yes"}}})
    body = {"preconditions": {"resourceVersion": stale}}
    async with api.delete(f"{BASE}/c1", json=body) as resp:
        assert resp.status == 409
    assert not api.objects["ray.io/v1/rayclusters", "ns", "c1"].deleted


async def test_delete_with_current_precondition_deletes(api: Emulator) -> None:
    version = (await _create(api))["metadata"]["resourceVersion"]
    body = {"preconditions": {"resourceVersion": version}}
    async with api.delete(f"{BASE}/c1", json=body) as resp:
        assert resp.status == 200
    assert api.objects["ray.io/v1/rayclusters", "ns", "c1"].deleted


async def test_marking_for_deletion_is_a_write(api: Emulator) -> None:
    version = (await _create(api, finalizers=["x/y"]))["metadata"]["resourceVersion"]
    async with api.delete(f"{BASE}/c1") as resp:
        assert resp.status == 200
    meta = api.objects["ray.io/v1/rayclusters", "ns", "c1"]["metadata"]
    assert meta["deletionTimestamp"]
    assert int(meta["resourceVersion"]) > int(version)


async def test_tripwire_landed_stores_the_write_and_holds_the_answer(api: Emulator) -> None:
    await _create(api)
    wire = api.tripwire(lambda r: r.action == kmock.action.UPDATE, landed=True)
    call = asyncio.create_task(_patch(api, {"metadata": {"labels": {"a": "1"}}}))
    await asyncio.wait_for(wire.tripped.wait(), PATIENCE)
    assert api.objects["ray.io/v1/rayclusters", "ns", "c1"]["metadata"]["labels"] == {"a": "1"}
    assert not call.done()
    wire.release()
    assert (await call)[0] == 503  # stored, but the (killed) client never gets a real answer
    assert api.objects["ray.io/v1/rayclusters", "ns", "c1"]["metadata"]["labels"] == {"a": "1"}


async def test_tripwire_not_landed_drops_the_write(api: Emulator) -> None:
    await _create(api)
    wire = api.tripwire(lambda r: r.action == kmock.action.UPDATE, landed=False)
    call = asyncio.create_task(_patch(api, {"metadata": {"labels": {"a": "1"}}}))
    await asyncio.wait_for(wire.tripped.wait(), PATIENCE)
    wire.release()
    assert (await call)[0] == 503
    assert "labels" not in api.objects["ray.io/v1/rayclusters", "ns", "c1"]["metadata"]
    # one-shot: the next write goes through
    assert (await _patch(api, {"metadata": {"labels": {"a": "2"}}}))[0] == 200


async def test_gate_makes_writers_with_one_version_race(api: Emulator) -> None:
    version = (await _create(api))["metadata"]["resourceVersion"]
    gate = api.gate(lambda r: r.action == kmock.action.UPDATE, count=2)
    first = asyncio.create_task(
        _patch(api, {"metadata": {"resourceVersion": version, "labels": {"who": "first"}}})
    )
    await eventually(lambda: gate.arrived == 1)  # the first writer is at the gate
    assert not first.done()  # held until the second writer arrives
    second = await _patch(api, {"metadata": {"resourceVersion": version, "labels": {"who": "x"}}})
    assert (await first)[0] == 200
    assert second[0] == 409
    assert gate.opened.is_set()
