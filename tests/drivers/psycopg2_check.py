"""psycopg2 through shardgate. Usage: psycopg2_check.py pooled|sharded URL

psycopg2 sends everything as simple queries with the values inlined, inside a
transaction it opens itself. The pooled checks use what pins a client to its server
connection: SQL PREPARE/EXECUTE and a temporary table, across transactions.
Prints "ok" and exits 0 when every check holds; a failed check raises.
"""
import sys

import psycopg2
import psycopg2.errors
import psycopg2.extras

from clients import run_clients


def pooled(url):
    def client(i):
        c = psycopg2.connect(url)
        cur = c.cursor()
        for k in range(100):
            cur.execute("SELECT %s::int + %s", (k, i))
            assert cur.fetchone()[0] == k + i
            c.commit()
        cur.execute("PREPARE times_five(int) AS SELECT $1 * 5")
        c.commit()
        cur.execute("EXECUTE times_five(%s)", (i,))
        assert cur.fetchone()[0] == 5 * i
        c.commit()
        cur.execute("DEALLOCATE times_five")
        cur.execute("CREATE TEMP TABLE mine (x int)")
        cur.execute("INSERT INTO mine VALUES (%s)", (i,))
        c.commit()
        cur.execute("SELECT x FROM mine")
        assert cur.fetchall() == [(i,)]
        cur.execute("DROP TABLE mine")
        c.commit()
        rows = psycopg2.extras.execute_values(
            cur, "SELECT * FROM (VALUES %s) v (a)", [(x,) for x in range(100)], fetch=True
        )
        assert len(rows) == 100
        c.commit()
        try:
            cur.execute("SELECT 1 / 0")
            raise AssertionError("division by zero did not fail")
        except psycopg2.errors.DivisionByZero as e:
            assert e.pgcode == "22012", e.pgcode
            c.rollback()
        c.close()

    run_clients(20, client)


def sharded(url):
    c = psycopg2.connect(url)
    cur = c.cursor()
    cur.execute("DELETE FROM posts")
    cur.execute("DELETE FROM users")
    c.commit()
    psycopg2.extras.execute_values(
        cur, "INSERT INTO users (id, name) VALUES %s", [(i, f"u{i}") for i in range(1, 101)]
    )
    c.commit()
    for i in range(1, 101):
        cur.execute("SELECT name FROM users WHERE id = %s", (i,))
        assert cur.fetchall() == [(f"u{i}",)], i
    c.commit()
    posts = [(k, k % 100 + 1, f"p{k}") for k in range(300)]
    insert = "INSERT INTO posts (id, user_id, body) VALUES (%s, %s, %s)"
    # execute_batch joins 100 statements at a time into one query, its keys on every
    # shard: run statement by statement. A failing page (a duplicate key) undoes the
    # whole transaction, on every shard.
    psycopg2.extras.execute_batch(cur, insert, posts[:150])
    try:
        psycopg2.extras.execute_batch(cur, insert, posts[140:160])
        raise AssertionError("a duplicate key did not fail")
    except psycopg2.errors.UniqueViolation:
        c.rollback()
    cur.execute("SELECT count(*) FROM posts")
    assert cur.fetchone() == (0,)
    c.commit()
    psycopg2.extras.execute_batch(cur, insert, posts)
    c.commit()
    cur.execute("SELECT count(*), sum(id) FROM posts")
    assert cur.fetchone() == (300, sum(range(300)))
    cur.execute("SELECT id FROM users ORDER BY id LIMIT 5")
    assert [r[0] for r in cur.fetchall()] == [1, 2, 3, 4, 5]
    c.commit()
    c.close()


if __name__ == "__main__":
    mode, url = sys.argv[1], sys.argv[2]
    {"pooled": pooled, "sharded": sharded}[mode](url)
    print("ok")
