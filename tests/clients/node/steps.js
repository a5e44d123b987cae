// The step runner shared by the Node.js workloads of the client matrix (tests/clients/harness.py):
// where to connect comes from the environment, each step is bounded in time, and each prints one
// RESULT line (ok, or fail with the error on one line, its SQLSTATE first when it has one).

export const env = {
  host: process.env.O7S_HOST,
  port: Number(process.env.O7S_PORT),
  user: process.env.O7S_USER,
  password: process.env.O7S_PASSWORD,
  database: process.env.O7S_DB,
  mode: process.env.O7S_MODE,
}

export const STEP_LIMIT_MS = 30000 // a step that has not ended by then is reported failed

export function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`)
}

export function eq(got, want, what) {
  const g = JSON.stringify(got)
  const w = JSON.stringify(want)
  if (g !== w) throw new Error(`check failed: ${what}: got ${g}, want ${w}`)
}

/** Await `promise` and return the error it rejects with; fail the step if it resolves. */
export async function rejects(promise, what) {
  try {
    await promise
  } catch (e) {
    return e
  }
  throw new Error(`check failed: ${what} did not fail`)
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

function oneLine(e) {
  const code = e && e.code ? `[${e.code}] ` : ''
  const text = e && e.stack ? e.stack : String(e)
  return (code + text).replace(/[\t\r\n]+/g, ' | ')
}

/** Run [name, fn] steps in order (only those named in argv when any are) and report each. */
export async function runSteps(steps, cleanup) {
  const wanted = new Set(process.argv.slice(2))
  for (const [name, fn] of steps) {
    if (wanted.size && !wanted.has(name)) continue
    let timer
    const limit = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`step did not end within ${STEP_LIMIT_MS} ms`)), STEP_LIMIT_MS)
    })
    try {
      await Promise.race([fn(), limit])
      process.stdout.write(`RESULT\t${name}\tok\n`)
    } catch (e) {
      process.stdout.write(`RESULT\t${name}\tfail\t${oneLine(e)}\n`)
    } finally {
      clearTimeout(timer)
    }
  }
  if (cleanup) await cleanup()
}
