"""psycopg 3 through shardgate. Usage: psycopg_check.py pooled|sharded URL

psycopg 3 prepares a statement on the server (named _pg3_N) once it has run it
prepare_threshold times, binds text or binary parameters, and copies with COPY.
Prints "ok" and exits 0 when every check holds; a failed check raises.
"""
import sys

import psycopg

from clients import run_clients


def pooled(url):
    def client(i):
        with psycopg.connect(url, autocommit=True) as c:
            c.prepare_threshold = 2
            for k in range(100):
                assert c.execute("SELECT %s::bigint + 1", (k,)).fetchone()[0] == k + 1
                row = c.execute("SELECT %s::text, %s::int", (f"c{i}", k), binary=k % 2 == 0).fetchone()
                assert row == (f"c{i}", k), row
            c.execute("SET search_path = pg_catalog, public")
            for _ in range(10):
                assert c.execute("SHOW search_path").fetchone()[0] == "pg_catalog, public"
            c.execute("RESET search_path")
            with c.transaction():
                c.execute("SET LOCAL work_mem = '7MB'")
                assert c.execute("SHOW work_mem").fetchone()[0] == "7MB"
            assert c.execute("SHOW work_mem").fetchone()[0] == "4MB"
            with c.cursor() as cur:
                cur.executemany("SELECT %s::int", [(x,) for x in range(30)])
                with cur.copy("COPY (SELECT g FROM generate_series(1, 500) g) TO STDOUT") as copy:
                    assert sum(1 for _ in copy.rows()) == 500
            try:
                c.execute("SELECT 1 / %s::int", (0,))
                raise AssertionError("division by zero did not fail")
            except psycopg.errors.DivisionByZero as e:
                assert e.sqlstate == "22012", e.sqlstate
            assert c.execute("SELECT %s::bigint + 1", (1,)).fetchone()[0] == 2
        with psycopg.connect(url) as c:  # not autocommit: every statement in a transaction
            c.prepare_threshold = 0
            for k in range(20):
                assert c.execute("SELECT %s::int * 3", (k,)).fetchone()[0] == 3 * k
                if k % 5 == 0:
                    c.commit()
            c.rollback()

    run_clients(20, client)


def sharded(url):
    with psycopg.connect(url, autocommit=True) as c:
        c.prepare_threshold = 2
        c.execute("DELETE FROM posts")
        c.execute("DELETE FROM users")
        with c.cursor() as cur:
            with cur.copy("COPY users (id, name) FROM STDIN") as copy:
                for i in range(1, 101):
                    copy.write_row((i, f"u{i}"))
        for i in range(1, 101):
            row = c.execute("SELECT name FROM users WHERE id = %s", (i,), binary=i % 2 == 0).fetchone()
            assert row == (f"u{i}",), (i, row)
        assert c.execute("SELECT count(*) FROM users").fetchone()[0] == 100
        with c.transaction():
            c.cursor().executemany(
                "INSERT INTO posts (id, user_id, body) VALUES (%s, %s, %s)",
                [(k, k % 100 + 1, f"p{k}") for k in range(300)],
            )
        rows = c.execute("SELECT user_id, count(*) FROM posts GROUP BY user_id ORDER BY user_id LIMIT 2").fetchall()
        assert rows == [(1, 3), (2, 3)], rows
        with c.cursor() as cur:
            with cur.copy("COPY (SELECT id FROM users) TO STDOUT") as copy:
                assert sorted(int(r[0]) for r in copy.rows()) == list(range(1, 101))
        # A server-side cursor (DECLARE) on one shard works; over all shards it is refused
        # (SHARDING.md), and the block's ROLLBACK, sent by the extended protocol, ends it.
        with c.transaction():
            with c.cursor(name="one_user") as cur:
                cur.execute("SELECT name FROM users WHERE id = %s", (5,))
                assert cur.fetchall() == [("u5",)]
        try:
            with c.transaction():
                with c.cursor(name="all_users") as cur:
                    cur.execute("SELECT id FROM users ORDER BY id")
            raise AssertionError("DECLARE over all shards was not refused")
        except psycopg.errors.FeatureNotSupported:
            pass
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert c.execute("SELECT count(*) FROM users").fetchone()[0] == 100


if __name__ == "__main__":
    mode, url = sys.argv[1], sys.argv[2]
    {"pooled": pooled, "sharded": sharded}[mode](url)
    print("ok")
