"""asyncpg through shardgate. Usage: asyncpg_check.py pooled|sharded URL

asyncpg prepares every statement it runs under its own name (its statement cache) and
sends parameters and results in binary: the driver that breaks in PgBouncer's
transaction mode unless its cache is turned off. Here the cache stays on.
Prints "ok" and exits 0 when every check holds; a failed check raises.
"""
import asyncio
import sys

import asyncpg


async def pooled(url):
    async def client(i):
        c = await asyncpg.connect(url)
        for k in range(100):
            assert await c.fetchval("SELECT $1::bigint + 1", k * i) == k * i + 1
            row = await c.fetchrow("SELECT $1::text AS t, $2::int AS n", f"c{i}", k)
            assert (row["t"], row["n"]) == (f"c{i}", k), row
            if k % 10 == 0:
                async with c.transaction():
                    await c.execute("SET LOCAL statement_timeout = 4000")
                    assert await c.fetchval("SHOW statement_timeout") == "4s"
                assert await c.fetchval("SHOW statement_timeout") == "0"
        # A session setting stays with this client, whichever server runs its next query.
        await c.execute(f"SET application_name = 'asyncpg{i}'")
        for _ in range(20):
            name = await c.fetchval("SELECT current_setting($1)", "application_name")
            assert name == f"asyncpg{i}", name
        stmt = await c.prepare("SELECT $1::int * 2")
        for k in range(30):
            assert await stmt.fetchval(k) == 2 * k
        rows = await c.fetch("SELECT g FROM generate_series(1, $1) g", 5000)
        assert len(rows) == 5000 and rows[-1]["g"] == 5000
        await c.executemany("SELECT $1::int", [(x,) for x in range(25)])
        try:
            await c.fetchval("SELECT 1 / $1::int", 0)
            raise AssertionError("division by zero did not fail")
        except asyncpg.DivisionByZeroError as e:
            assert e.sqlstate == "22012", e.sqlstate
        # The statement cache survives the error and the pool switches.
        assert await c.fetchval("SELECT $1::bigint + 1", 41) == 42
        await c.close()

    await asyncio.gather(*(client(i) for i in range(20)))


async def sharded(url):
    c = await asyncpg.connect(url)
    await c.execute("DELETE FROM posts")
    await c.execute("DELETE FROM users")
    # Binary COPY, split by row to the key's shard.
    await c.copy_records_to_table("users", records=[(i, f"u{i}") for i in range(1, 51)], columns=["id", "name"])
    for i in range(51, 101):
        await c.execute("INSERT INTO users (id, name) VALUES ($1, $2)", i, f"u{i}")
    for i in range(1, 101):
        row = await c.fetchrow("SELECT id, name FROM users WHERE id = $1", i)
        assert row is not None and row["name"] == f"u{i}", (i, row)
    assert await c.fetchval("SELECT count(*) FROM users") == 100
    rows = await c.fetch("SELECT id FROM users ORDER BY id DESC LIMIT 3")
    assert [r["id"] for r in rows] == [100, 99, 98], rows
    await c.executemany(
        "INSERT INTO posts (id, user_id, body) VALUES ($1, $2, $3)",
        [(k, k % 100 + 1, f"p{k}") for k in range(300)],
    )
    assert await c.fetchval("SELECT count(*) FROM posts WHERE user_id = $1", 5) == 3
    assert await c.fetchval("SELECT sum(id) FROM posts") == sum(range(300))
    async with c.transaction():
        await c.execute("UPDATE users SET name = $2 WHERE id = $1", 7, "seven")
        await c.execute("UPDATE users SET name = $2 WHERE id = $1", 8, "eight")
    assert await c.fetchval("SELECT name FROM users WHERE id = $1", 7) == "seven"
    assert await c.fetchval("SELECT name FROM users WHERE id = $1", 8) == "eight"
    await c.close()


if __name__ == "__main__":
    mode, url = sys.argv[1], sys.argv[2]
    asyncio.run({"pooled": pooled, "sharded": sharded}[mode](url))
    print("ok")
