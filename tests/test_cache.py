"""The answer cache unit: byte bounds and a failing disk."""

import asyncio

from proxy.serving.cache import AnswerCache, CachedAnswer


def answer(n=1, size=100):
    return CachedAnswer(["x" * size] * n, "stop", 3, n, "m", "w-0")


def test_memory_tier_is_bounded_by_bytes(tmp_path):
    async def run():
        cache = AnswerCache(memory_bytes=5000, disk_bytes=0, disk_dir=tmp_path, ttl_s=60)
        for i in range(100):
            await cache.put(f"k{i}", answer(size=400))
        assert cache.memory.currsize <= 5000 and len(cache.memory) < 100
        assert await cache.get("k99") is not None and await cache.get("k0") is None
        cache.close()
    asyncio.run(run())


def test_disk_tier_respects_its_byte_bound(tmp_path):
    async def run():
        cache = AnswerCache(memory_bytes=0, disk_bytes=200_000, disk_dir=tmp_path / "d", ttl_s=60)
        for i in range(400):
            await cache.put(f"k{i}", answer(size=2000))
        stats = await cache.stats()
        assert stats["disk_available"] and stats["disk_bytes"] <= 200_000 * 1.1, stats
        assert await cache.get("k399") is not None
        cache.close()
    asyncio.run(run())


def test_unusable_disk_degrades_to_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    async def run():
        cache = AnswerCache(memory_bytes=10_000, disk_bytes=10_000, disk_dir=blocker / "cache", ttl_s=60)
        await cache.put("k", answer())
        assert (await cache.get("k")).pieces == answer().pieces  # memory still serves
        assert (await cache.stats())["disk_available"] is False
        cache.close()
    asyncio.run(run())
    assert "disk cache unavailable" in caplog.text


def test_a_hot_answer_is_decoded_once_and_its_prebuilt_bodies_go_with_its_entry(tmp_path):
    async def run():
        cache = AnswerCache(memory_bytes=100_000, disk_bytes=0, disk_dir=tmp_path, ttl_s=60)
        await cache.put("k", answer(n=2, size=10))
        first = await cache.get("k")
        again = await cache.get("k")
        assert again is first  # decoded once while the memory tier holds the same bytes
        bodies = cache.bodies("k", first)
        bodies["format"] = b"prebuilt"
        assert cache.bodies("k", again) == {"format": b"prebuilt"}
        await cache.put("k", CachedAnswer(["new"], "stop", 3, 1, "m", "w-0"))  # a new answer for the key
        replaced = await cache.get("k")
        assert replaced.pieces == ["new"] and replaced is not first
        assert cache.bodies("k", replaced) == {}  # nothing pre-built from the old answer survives
        assert cache.bodies("k", first) is None
        await cache.clear()
        assert await cache.get("k") is None and cache.bodies("k", replaced) is None
        cache.close()
    asyncio.run(run())
