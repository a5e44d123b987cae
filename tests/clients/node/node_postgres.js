// postgres.js (`postgres`) through O7s with its defaults (prepare: true, so every static query is a
// named statement, pipelined): transactions and savepoints with sql.begin, COPY in and out as
// streams, cursors, errors with the connection staying usable, query.cancel() and statement timeouts,
// and a pool of connections used at once. Run by tests/test_clients_node.py; prints RESULT lines.

import { pipeline } from 'node:stream/promises'
import { Readable, Writable } from 'node:stream'
import postgres from 'postgres'
import { env, check, eq, rejects, sleep, runSteps } from './steps.js'

const TABLE = 'node_postgres_item'
const WORKERS = 6 // connections used at once (the enterprise tier's backend pool is 50)
const ROUNDS = 20 // transactions per worker
const COPY_ROWS = 2000
const COPY_OUT_PIECE = 500 // rows (~6 KiB) per COPY out
const CANCEL_AFTER_MS = 500
const CANCELLED_WITHIN_MS = 5000
const CANCELS = 2
// Now and then a cancel also ends the next statement on the connection, 1-4 ms into it: directly
// against PostgreSQL 15 as through O7s (4 and 2 of 60 tries with postgres.js). Such a statement is
// run again, up to this many times in all.
const CANCEL_RETRIES = 2

const connect = (extra = {}) => postgres({
  host: env.host, port: env.port, username: env.user, password: env.password, database: env.database,
  ssl: false, connect_timeout: 10, max: 1, onnotice: () => {}, ...extra,
})

async function withSql(fn, extra) {
  const sql = connect(extra)
  try {
    return await fn(sql)
  } finally {
    await sql.end({ timeout: 5 })
  }
}

async function setup() {
  await withSql(async (sql) => {
    await sql.unsafe(`DROP TABLE IF EXISTS ${TABLE}`)
    await sql.unsafe(`CREATE TABLE ${TABLE} (id int PRIMARY KEY, name text NOT NULL, score int NOT NULL DEFAULT 0)`)
  })
}

async function preparedStatements() {
  await withSql(async (sql) => {
    const t = sql(TABLE)
    await sql`DELETE FROM ${t}`
    const all = Buffer.from(Array.from({ length: 256 }, (_, i) => i))
    for (let i = 0; i < 20; i++) {
      const [row] = await sql`SELECT ${i}::int * 2 AS d, ${`é\n'${i}`}::text AS t, ${all}::bytea AS b,
        ${null}::int AS n, ${sql.json({ k: [i, null] })}::jsonb AS j, ${[i, i + 1]}::int[] AS a`
      eq([row.d, row.t, row.n, row.j, row.a], [i * 2, `é\n'${i}`, null, { k: [i, null] }, [i, i + 1]], 'round trip')
      check(Buffer.compare(row.b, all) === 0, 'all byte values')
    }
    // The same prepared statements in many transactions (in transaction mode, on any backend).
    for (let k = 0; k < 10; k++) {
      await sql.begin(async (tx) => {
        for (let j = 0; j < 3; j++) await tx`INSERT INTO ${t} (id, name) VALUES (${k * 3 + j}, ${'p' + (k * 3 + j)})`
        const [{ n }] = await tx`SELECT count(*)::int AS n FROM ${t}`
        eq(n, k * 3 + 3, 'rows inside the transaction')
        const [{ ps }] = await tx`SELECT count(*)::int AS ps FROM pg_prepared_statements`
        check(ps >= 1, 'a statement is prepared on the backend')
      })
    }
    // Describe without executing, and rows in pieces through a cursor.
    const d = await sql`SELECT id, name FROM ${t} WHERE id = ${1}`.describe()
    eq(d.columns.map((c) => c.name), ['id', 'name'], 'described columns')
    const seen = []
    await sql.begin(async (tx) => {
      for await (const rows of tx`SELECT id FROM ${t} ORDER BY id`.cursor(7)) seen.push(...rows.map((r) => r.id))
    })
    eq(seen, Array.from({ length: 30 }, (_, i) => i), 'rows read through a cursor')
  })
}

async function transactions() {
  await withSql(async (sql) => {
    const t = sql(TABLE)
    await sql`DELETE FROM ${t}`
    await sql.begin((tx) => tx`INSERT INTO ${t} (id, name) VALUES (1, 'kept')`)
    await rejects(sql.begin(async (tx) => {
      await tx`INSERT INTO ${t} (id, name) VALUES (2, 'dropped')`
      throw new Error('roll back')
    }), 'a transaction that throws')
    await sql.begin(async (tx) => {
      await tx`INSERT INTO ${t} (id, name) VALUES (3, 'outer')`
      await rejects(tx.savepoint(async (sp) => {
        await sp`INSERT INTO ${t} (id, name) VALUES (4, 'in savepoint')`
        throw new Error('roll the savepoint back')
      }), 'a savepoint that throws')
      await tx.savepoint((sp) => sp`INSERT INTO ${t} (id, name) VALUES (5, 'savepoint kept')`)
    })
    // A failing statement rolls the whole transaction back.
    const e = await rejects(sql.begin(async (tx) => {
      await tx`INSERT INTO ${t} (id, name) VALUES (6, 'before the error')`
      await tx`SELECT 1 / 0`
    }), 'division by zero in a transaction')
    eq(e.code, '22012', 'sqlstate')
    const [{ ids }] = await sql`SELECT array_agg(id ORDER BY id) AS ids FROM ${t}`
    eq(ids, [1, 3, 5], 'committed rows')
    // Multi-statement simple queries.
    const res = await sql.unsafe(`SELECT 1 AS a; SELECT 2 AS b`)
    eq(res.map((r) => r[0]), [{ a: 1 }, { b: 2 }], 'two results')
  })
}

async function copyInAndOut() {
  await withSql(async (sql) => {
    const t = sql(TABLE)
    await sql`DELETE FROM ${t}`
    const lines = Array.from({ length: COPY_ROWS }, (_, i) => `${i}\tc${i}\t${i % 7}\n`)
    await pipeline(Readable.from(lines), await sql`COPY ${t} (id, name, score) FROM STDIN`.writable())
    const [row] = await sql`SELECT count(*)::int AS n, sum(score)::int AS s FROM ${t}`
    eq(row, { n: COPY_ROWS, s: lines.reduce((a, _, i) => a + (i % 7), 0) }, 'rows copied in')
    // Out in pieces under 16 KiB: postgres.js 3.4 leaves its socket paused, and the connection hung,
    // when a COPY's output past its stream's high-water mark arrives in one read with CopyDone
    // (directly against PostgreSQL too; porsager/postgres issue 499).
    let out = ''
    for (let from = 0; from < COPY_ROWS; from += COPY_OUT_PIECE) {
      const upto = from + COPY_OUT_PIECE
      await pipeline(await sql.unsafe(`COPY (SELECT id, name, score FROM ${TABLE} WHERE id >= ${from} AND id < ${upto}
        ORDER BY id) TO STDOUT`).readable(),
      new Writable({ write(chunk, _enc, done) { out += chunk.toString(); done() } }))
    }
    eq(out, lines.join(''), 'rows copied out')
    // COPY in a transaction after a SET (issue 14, group 1), then rolled back.
    await rejects(sql.begin(async (tx) => {
      await tx`SET LOCAL work_mem = '8MB'`
      await pipeline(Readable.from(['100000\tx\t1\n']), await tx`COPY ${t} (id, name, score) FROM STDIN`.writable())
      throw new Error('roll back')
    }), 'the rolled-back COPY')
    const [{ n }] = await sql`SELECT count(*)::int AS n FROM ${t}`
    eq(n, COPY_ROWS, 'rows after the rolled-back COPY')
  })
}

async function errorThenUsable() {
  await withSql(async (sql) => {
    const t = sql(TABLE)
    await sql`DELETE FROM ${t} WHERE id < 0`
    await sql`INSERT INTO ${t} (id, name) VALUES (-1, 'unique')`
    const dup = await rejects(sql`INSERT INTO ${t} (id, name) VALUES (${-1}, ${'again'})`, 'a duplicate key')
    eq([dup.code, dup.constraint_name, dup.table_name], ['23505', `${TABLE}_pkey`, TABLE], 'error fields')
    const cast = await rejects(sql`SELECT ${'nope'}::int`, 'a bad cast')
    eq(cast.code, '22P02', 'sqlstate of the bad cast')
    const syntax = await rejects(sql.unsafe('SELEC 1'), 'a syntax error')
    eq(syntax.code, '42601', 'sqlstate of the syntax error')
    const missing = await rejects(sql`SELECT * FROM no_such_table`, 'an unknown table')
    eq(missing.code, '42P01', 'sqlstate of the unknown table')
    // The same prepared statement once more, now without the error; NOTICEs reach onnotice.
    const [r] = await sql`INSERT INTO ${t} (id, name) VALUES (${-2}, ${'fresh'}) RETURNING id`
    eq(r.id, -2, 'the statement after its error')
    eq(await sql`SELECT 'after' AS a`, [{ a: 'after' }], 'usable after the errors')
  })
  const notices = []
  await withSql(async (sql) => {
    await sql`DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$`
    eq(notices.map((n) => [n.severity, n.message]), [['NOTICE', 'hello 42']], 'notices')
  }, { onnotice: (n) => notices.push(n) })
}

async function cancel() {
  await withSql(async (sql) => {
    let cancelled = 0
    for (let i = 0; cancelled < CANCELS && i < CANCELS + CANCEL_RETRIES; i++) {
      const t0 = Date.now()
      let endedAt = null
      const q = sql`SELECT pg_sleep(10)`
      const outcome = rejects(q.execute().finally(() => { endedAt = Date.now() - t0 }), 'the cancelled query')
      await sleep(CANCEL_AFTER_MS)
      if (endedAt !== null && (await outcome).code === '57014') continue // the previous cancel landed late
      check(endedAt === null, `cancel ${i}: the query ended ${endedAt} ms in, before its cancel was sent`)
      await q.cancel()
      const e = await outcome
      eq(e.code, '57014', 'sqlstate of the cancelled query')
      check(Date.now() - t0 < CANCELLED_WITHIN_MS, `the cancel took ${Date.now() - t0} ms`)
      eq(await sql`SELECT 'after cancel' AS a`, [{ a: 'after cancel' }], 'usable after the cancel')
      cancelled++
    }
    eq(cancelled, CANCELS, 'queries cancelled')
    const e = await rejects(sql.begin(async (tx) => {
      await tx`SET LOCAL statement_timeout = '200ms'`
      await tx`SELECT pg_sleep(5)`
    }), 'the statement timeout')
    eq(e.code, '57014', 'sqlstate of the statement timeout')
    eq(await sql`SELECT 1 AS one`, [{ one: 1 }], 'usable after the timeout')
  })
  // statement_timeout as a startup parameter: it must hold on every backend the session uses.
  await withSql(async (sql) => {
    for (let i = 0; i < 3; i++) {
      const e = await rejects(sql`SELECT pg_sleep(5)`, 'the startup statement_timeout')
      eq(e.code, '57014', 'sqlstate')
    }
    const [row] = await sql`SHOW statement_timeout`
    eq(row.statement_timeout, '1s', 'statement_timeout')
  }, { connection: { statement_timeout: 1000 } })
}

async function poolConcurrent() {
  await withSql(async (sql) => {
    const t = sql(TABLE)
    await sql`DELETE FROM ${t}`
    await sql`INSERT INTO ${t} (id, name) SELECT g, 'w' || g FROM generate_series(0, ${WORKERS - 1}::int) g`
    const work = async (w) => {
      for (let i = 0; i < ROUNDS; i++) {
        await sql.begin(async (tx) => {
          const [{ score }] = await tx`SELECT score FROM ${t} WHERE id = ${w} FOR UPDATE`
          await tx`UPDATE ${t} SET score = ${score + 1} WHERE id = ${w}`
        })
      }
    }
    await Promise.all(Array.from({ length: WORKERS }, (_, w) => work(w)))
    const [{ s }] = await sql`SELECT array_agg(score ORDER BY id) AS s FROM ${t}`
    eq(s, Array(WORKERS).fill(ROUNDS), 'scores after the concurrent transactions')
    // Many queries at once, pipelined over the pool's connections.
    const many = await Promise.all(Array.from({ length: 60 }, (_, i) => sql`SELECT ${i}::int + 1 AS n`))
    eq(many.map((m) => m[0].n), Array.from({ length: 60 }, (_, i) => i + 1), 'pooled queries')
    const [{ conns }] = await sql`SELECT count(*)::int AS conns FROM pg_stat_activity WHERE datname = current_database()`
    check(conns >= 1, 'pg_stat_activity')
  }, { max: WORKERS })
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
