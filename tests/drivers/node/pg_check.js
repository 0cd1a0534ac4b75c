// node-postgres through shardgate. Usage: node pg_check.js pooled|sharded URL
//
// node-postgres runs a query with parameters as the unnamed statement, and as a named
// statement, prepared once per connection, when the query object has a name.
// Prints "ok" and exits 0 when every check holds; a failed check throws.
'use strict';
const { Client } = require('pg');

function check(cond, what) {
  if (!cond) throw new Error('check failed: ' + what);
}

async function pooledClient(url, i) {
  const c = new Client({ connectionString: url });
  await c.connect();
  for (let k = 0; k < 100; k++) {
    let r = await c.query('SELECT $1::int + 1 AS v', [k]);
    check(r.rows[0].v === k + 1, 'unnamed statement');
    r = await c.query({ name: 'twice', text: 'SELECT $1::int * 2 AS v', values: [k] });
    check(r.rows[0].v === 2 * k, 'named statement');
    r = await c.query({ name: 'label', text: 'SELECT $1::text || $2::text AS v', values: ['c', String(i)] });
    check(r.rows[0].v === 'c' + i, 'second named statement');
    if (k % 10 === 0) {
      await c.query('BEGIN');
      await c.query("SET LOCAL lock_timeout = '3s'");
      r = await c.query('SHOW lock_timeout');
      check(r.rows[0].lock_timeout === '3s', 'SET LOCAL inside the transaction');
      await c.query('COMMIT');
    }
  }
  await c.query(`SET application_name = 'node${i}'`);
  for (let k = 0; k < 10; k++) {
    const r = await c.query({ name: 'setting', text: 'SELECT current_setting($1) AS v', values: ['application_name'] });
    check(r.rows[0].v === 'node' + i, 'session setting: ' + r.rows[0].v);
  }
  let error = null;
  try {
    await c.query({ name: 'divide', text: 'SELECT 1 / $1::int AS v', values: [0] });
  } catch (e) {
    error = e;
  }
  check(error && error.code === '22012', 'division by zero: ' + (error && error.code));
  const r = await c.query({ name: 'twice', text: 'SELECT $1::int * 2 AS v', values: [21] });
  check(r.rows[0].v === 42, 'named statement after an error');
  await c.end();
}

async function pooled(url) {
  await Promise.all([...Array(20).keys()].map((i) => pooledClient(url, i)));
}

async function sharded(url) {
  const c = new Client({ connectionString: url });
  await c.connect();
  await c.query('DELETE FROM posts');
  await c.query('DELETE FROM users');
  for (let i = 1; i <= 100; i++) {
    await c.query({ name: 'add_user', text: 'INSERT INTO users (id, name) VALUES ($1, $2)', values: [i, 'u' + i] });
  }
  for (let i = 1; i <= 100; i++) {
    const r = await c.query({ name: 'user_by_id', text: 'SELECT id, name FROM users WHERE id = $1', values: [i] });
    check(r.rows.length === 1 && r.rows[0].name === 'u' + i, 'user ' + i);
  }
  await c.query('BEGIN');
  for (let k = 0; k < 300; k++) {
    await c.query({ name: 'add_post', text: 'INSERT INTO posts (id, user_id, body) VALUES ($1, $2, $3)', values: [k, (k % 100) + 1, 'p' + k] });
  }
  await c.query('COMMIT');
  let r = await c.query({ name: 'posts_of', text: 'SELECT count(*)::int AS n FROM posts WHERE user_id = $1', values: [3] });
  check(r.rows[0].n === 3, 'posts of user 3');
  r = await c.query('SELECT id FROM users ORDER BY id LIMIT 5');
  check(r.rows.map((x) => Number(x.id)).join() === '1,2,3,4,5', 'ORDER BY across shards');
  r = await c.query('SELECT count(*)::int AS n FROM users');
  check(r.rows[0].n === 100, 'count across shards');
  await c.end();
}

const [mode, url] = process.argv.slice(2);
({ pooled, sharded })[mode](url).then(
  () => console.log('ok'),
  (e) => {
    console.error(e);
    process.exit(1);
  },
);
