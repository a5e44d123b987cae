// node-postgres (`pg`) through O7s: named statements, transactions and savepoints, COPY in and out
// (pg-copy-streams), errors with the connection staying usable, a cancel and statement timeouts,
// and a pg.Pool used at once by several workers. Run by tests/test_clients_node.py; prints RESULT lines.

import { pipeline } from 'node:stream/promises'
import { Readable, Writable } from 'node:stream'
import pg from 'pg'
import copyStreams from 'pg-copy-streams'
import Cursor from 'pg-cursor'
import { env, check, eq, rejects, sleep, runSteps } from './steps.js'

const TABLE = 'node_pg_item'
const WORKERS = 6 // pool connections used at once (the enterprise tier's backend pool is 50)
const ROUNDS = 20 // transactions per worker
const COPY_ROWS = 2000
const CANCEL_AFTER_MS = 500
const CANCELLED_WITHIN_MS = 5000
const CANCELS = 2
// Now and then a cancel also ends the next statement on the connection, 1-4 ms into it: directly
// against PostgreSQL 15 as through O7s (4 and 2 of 60 tries with postgres.js). Such a statement is
// run again, up to this many times in all.
const CANCEL_RETRIES = 2

const config = (extra = {}) => ({
  host: env.host, port: env.port, user: env.user, password: env.password, database: env.database,
  ssl: false, connectionTimeoutMillis: 10000, ...extra,
})

async function withClient(fn, extra) {
  const c = new pg.Client(config(extra))
  await c.connect()
  try {
    return await fn(c)
  } finally {
    await c.end()
  }
}

async function setup() {
  await withClient(async (c) => {
    await c.query(`DROP TABLE IF EXISTS ${TABLE}`)
    await c.query(`CREATE TABLE ${TABLE} (id int PRIMARY KEY, name text NOT NULL, score int NOT NULL DEFAULT 0)`)
  })
}

async function preparedStatements() {
  await withClient(async (c) => {
    await c.query(`DELETE FROM ${TABLE}`)
    const all = Buffer.from(Array.from({ length: 256 }, (_, i) => i))
    for (let i = 0; i < 20; i++) {
      const r = await c.query({
        name: 'types', text: 'SELECT $1::int * 2 AS d, $2::text AS t, $3::bytea AS b, $4::int AS n, $5::jsonb AS j',
        values: [i, `é\n'${i}`, all, null, { k: [i, null] }],
      })
      const row = r.rows[0]
      eq([row.d, row.t, row.n, row.j], [i * 2, `é\n'${i}`, null, { k: [i, null] }], 'round trip')
      check(Buffer.compare(row.b, all) === 0, 'all byte values')
    }
    // A named statement prepared once, run in many transactions: in transaction mode each may be on
    // another backend, where O7s must prepare it again.
    for (let t = 0; t < 10; t++) {
      await c.query('BEGIN')
      for (let k = 0; k < 3; k++) {
        const id = t * 3 + k
        await c.query({ name: 'ins', text: `INSERT INTO ${TABLE} (id, name) VALUES ($1, $2)`, values: [id, `p${id}`] })
      }
      const n = await c.query({ name: 'count', text: `SELECT count(*)::int AS n FROM ${TABLE}` })
      eq(n.rows[0].n, t * 3 + 3, 'rows inside the transaction')
      const ps = await c.query('SELECT count(*)::int AS n FROM pg_prepared_statements')
      check(ps.rows[0].n >= 1, 'a statement is prepared on the backend')
      await c.query('COMMIT')
    }
    // Binary results (rowMode array and a cursor over the extended protocol).
    const arr = await c.query({ name: 'arr', text: 'SELECT g, g::text FROM generate_series(1, $1::int) g', values: [5], rowMode: 'array' })
    eq(arr.rows, [[1, '1'], [2, '2'], [3, '3'], [4, '4'], [5, '5']], 'rowMode array')
    await c.query('BEGIN')
    const cur = c.query(new Cursor(`SELECT id FROM ${TABLE} ORDER BY id`))
    const seen = []
    for (;;) {
      const rows = await cur.read(7)
      if (!rows.length) break
      seen.push(...rows.map((r) => r.id))
    }
    await cur.close()
    await c.query('COMMIT')
    eq(seen, Array.from({ length: 30 }, (_, i) => i), 'rows read through a cursor')
  })
}

async function transactions() {
  await withClient(async (c) => {
    await c.query(`DELETE FROM ${TABLE}`)
    await c.query('BEGIN')
    await c.query(`INSERT INTO ${TABLE} (id, name) VALUES (1, 'kept')`)
    await c.query('COMMIT')
    await c.query('BEGIN')
    await c.query(`INSERT INTO ${TABLE} (id, name) VALUES (2, 'dropped')`)
    await c.query('ROLLBACK')
    await c.query('BEGIN')
    await c.query(`INSERT INTO ${TABLE} (id, name) VALUES (3, 'outer')`)
    await c.query('SAVEPOINT sp')
    await c.query(`INSERT INTO ${TABLE} (id, name) VALUES (4, 'in savepoint')`)
    await c.query('ROLLBACK TO SAVEPOINT sp')
    await c.query(`INSERT INTO ${TABLE} (id, name) VALUES (5, 'after savepoint')`)
    await c.query('COMMIT')
    // An error in a transaction aborts it until ROLLBACK.
    await c.query('BEGIN')
    const e = await rejects(c.query('SELECT 1 / 0'), 'division by zero')
    eq(e.code, '22012', 'sqlstate')
    const aborted = await rejects(c.query('SELECT 1'), 'a query in an aborted transaction')
    eq(aborted.code, '25P02', 'sqlstate in the aborted transaction')
    await c.query('ROLLBACK')
    const r = await c.query(`SELECT array_agg(id ORDER BY id) AS ids FROM ${TABLE}`)
    eq(r.rows[0].ids, [1, 3, 5], 'committed rows')
    // A multi-statement simple query is one implicit transaction.
    await rejects(c.query(`INSERT INTO ${TABLE} (id, name) VALUES (6, 'x'); SELECT 1 / 0`), 'multi-statement error')
    const six = await c.query(`SELECT count(*)::int AS n FROM ${TABLE} WHERE id = 6`)
    eq(six.rows[0].n, 0, 'the failed multi-statement query left nothing')
  })
}

async function copyInAndOut() {
  await withClient(async (c) => {
    await c.query(`DELETE FROM ${TABLE}`)
    const lines = Array.from({ length: COPY_ROWS }, (_, i) => `${i}\tc${i}\t${i % 7}\n`)
    await pipeline(Readable.from(lines), c.query(copyStreams.from(`COPY ${TABLE} (id, name, score) FROM STDIN`)))
    const n = await c.query(`SELECT count(*)::int AS n, sum(score)::int AS s FROM ${TABLE}`)
    eq(n.rows[0], { n: COPY_ROWS, s: lines.reduce((a, _, i) => a + (i % 7), 0) }, 'rows copied in')
    let out = ''
    await pipeline(c.query(copyStreams.to(`COPY (SELECT id, name, score FROM ${TABLE} ORDER BY id) TO STDOUT`)),
      new Writable({ write(chunk, _enc, done) { out += chunk.toString(); done() } }))
    eq(out, lines.join(''), 'rows copied out')
    // COPY in a transaction after a SET (issue 14, group 1), then rolled back.
    await c.query('BEGIN')
    await c.query("SET LOCAL work_mem = '8MB'")
    await pipeline(Readable.from(['100000\tx\t1\n']), c.query(copyStreams.from(`COPY ${TABLE} (id, name, score) FROM STDIN`)))
    await c.query('ROLLBACK')
    // A bad row fails the COPY; the connection goes on.
    const bad = await rejects(pipeline(Readable.from(['1\tdup\t0\n']),
      c.query(copyStreams.from(`COPY ${TABLE} (id, name, score) FROM STDIN`))), 'a COPY of a duplicate key')
    eq(bad.code, '23505', 'sqlstate of the failed COPY')
    const after = await c.query(`SELECT count(*)::int AS n FROM ${TABLE}`)
    eq(after.rows[0].n, COPY_ROWS, 'rows after the failed COPY')
  })
}

async function errorThenUsable() {
  await withClient(async (c) => {
    await c.query(`DELETE FROM ${TABLE} WHERE id < 0`)
    await c.query(`INSERT INTO ${TABLE} (id, name) VALUES (-1, 'unique')`)
    const dup = await rejects(c.query({ name: 'dup', text: `INSERT INTO ${TABLE} (id, name) VALUES ($1, $2)`, values: [-1, 'again'] }),
      'a duplicate key')
    eq([dup.code, dup.constraint, dup.table], ['23505', `${TABLE}_pkey`, TABLE], 'error fields')
    const cast = await rejects(c.query({ text: 'SELECT $1::int', values: ['nope'] }), 'a bad cast')
    eq(cast.code, '22P02', 'sqlstate of the bad cast')
    const syntax = await rejects(c.query('SELEC 1'), 'a syntax error')
    eq([syntax.code, syntax.position], ['42601', '1'], 'syntax error fields')
    const missing = await rejects(c.query({ name: 'missing', text: 'SELECT * FROM no_such_table' }), 'an unknown table')
    eq(missing.code, '42P01', 'sqlstate of the unknown table')
    // The same statement names work after the errors; a NOTICE arrives as a notice.
    const notices = []
    c.on('notice', (m) => notices.push([m.severity, m.message]))
    await c.query("DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$")
    eq(notices, [['NOTICE', 'hello 42']], 'notices')
    const r = await c.query({ name: 'dup', text: `INSERT INTO ${TABLE} (id, name) VALUES ($1, $2)`, values: [-2, 'fresh'] })
    eq(r.rowCount, 1, 'the named statement after its error')
    eq((await c.query("SELECT 'after' AS a")).rows, [{ a: 'after' }], 'usable after the errors')
  })
}

async function cancel() {
  // The driver's cancel (a CancelRequest on a new connection) of a running query.
  await withClient(async (c) => {
    let cancelled = 0
    for (let i = 0; cancelled < CANCELS && i < CANCELS + CANCEL_RETRIES; i++) {
      const t0 = Date.now()
      let endedAt = null
      const q = c.query('SELECT pg_sleep(10)')
      const outcome = rejects(q.finally(() => { endedAt = Date.now() - t0 }), 'the cancelled query')
      await sleep(CANCEL_AFTER_MS)
      if (endedAt !== null && (await outcome).code === '57014') continue // the previous cancel landed late
      check(endedAt === null, `cancel ${i}: the query ended ${endedAt} ms in, before its cancel was sent`)
      new pg.Client(config()).cancel(c, c.activeQuery)
      const e = await outcome
      eq(e.code, '57014', 'sqlstate of the cancelled query')
      check(Date.now() - t0 < CANCELLED_WITHIN_MS, `the cancel took ${Date.now() - t0} ms`)
      eq((await c.query("SELECT 'after cancel' AS a")).rows, [{ a: 'after cancel' }], 'usable after the cancel')
      cancelled++
    }
    eq(cancelled, CANCELS, 'queries cancelled')
    // A statement timeout for one transaction.
    await c.query('BEGIN')
    await c.query("SET LOCAL statement_timeout = '200ms'")
    const e = await rejects(c.query('SELECT pg_sleep(5)'), 'the statement timeout')
    eq(e.code, '57014', 'sqlstate of the statement timeout')
    await c.query('ROLLBACK')
    eq((await c.query('SELECT 1 AS one')).rows, [{ one: 1 }], 'usable after the timeout')
  })
  // statement_timeout as a startup parameter: it must hold on every backend the session uses.
  await withClient(async (c) => {
    for (let i = 0; i < 3; i++) {
      const e = await rejects(c.query('SELECT pg_sleep(5)'), 'the startup statement_timeout')
      eq(e.code, '57014', 'sqlstate')
    }
    eq((await c.query('SHOW statement_timeout')).rows[0].statement_timeout, '1s', 'statement_timeout')
  }, { statement_timeout: 1000 })
}

async function poolConcurrent() {
  const pool = new pg.Pool(config({ max: WORKERS }))
  try {
    await pool.query(`DELETE FROM ${TABLE}`)
    await pool.query(`INSERT INTO ${TABLE} (id, name) SELECT g, 'w' || g FROM generate_series(0, ${WORKERS - 1}) g`)
    const work = async (w) => {
      for (let i = 0; i < ROUNDS; i++) {
        const c = await pool.connect()
        try {
          await c.query('BEGIN')
          const r = await c.query({ name: 'lock', text: `SELECT score FROM ${TABLE} WHERE id = $1 FOR UPDATE`, values: [w] })
          await c.query({ name: 'bump', text: `UPDATE ${TABLE} SET score = $2 WHERE id = $1`, values: [w, r.rows[0].score + 1] })
          await c.query('COMMIT')
        } finally {
          c.release()
        }
      }
    }
    await Promise.all(Array.from({ length: WORKERS }, (_, w) => work(w)))
    const r = await pool.query(`SELECT array_agg(score ORDER BY id) AS s FROM ${TABLE}`)
    eq(r.rows[0].s, Array(WORKERS).fill(ROUNDS), 'scores after the concurrent transactions')
    // Many queries on the pool at once, each on whichever connection is free.
    const many = await Promise.all(Array.from({ length: 60 }, (_, i) => pool.query({ text: 'SELECT $1::int + 1 AS n', values: [i] })))
    eq(many.map((m) => m.rows[0].n), Array.from({ length: 60 }, (_, i) => i + 1), 'pooled queries')
    check(pool.totalCount <= WORKERS, `pool grew to ${pool.totalCount}`)
  } finally {
    await pool.end()
  }
}

await runSteps([
  ['setup', setup],
  ['prepared_statements', preparedStatements],
  ['transactions', transactions],
  ['copy', copyInAndOut],
  ['error_then_usable', errorThenUsable],
  ['cancel', cancel],
  ['pool_concurrent', poolConcurrent],
])
