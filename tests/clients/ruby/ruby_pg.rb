# Ruby's pg (Debian ruby-pg, on libpq) through O7s: exec_params with text and binary values,
# prepare/exec_prepared reused across transactions, transactions with savepoints and rollback,
# copy_data in and out and a failed COPY, errors with their fields and the connection staying
# usable, a cancel (PG::Connection#cancel from another thread) and statement_timeout, and several
# connections at once. Run by tests/test_clients_ruby.py; prints one RESULT line per step
# (tests/clients/harness.py).

require 'pg'
require 'timeout'

TABLE = 'ruby_pg_item'
STEP_LIMIT_S = 30 # each step is bounded in time
COPY_ROWS = 2000
WORKERS = 6 # connections at once (the enterprise tier's backend pool is 50)
ROUNDS = 20 # transactions per worker
CANCEL_AFTER_S = 0.5
CANCELLED_WITHIN_S = 5.0
QUERY_CANCELED = '57014'

class CheckFailed < StandardError; end

def env(name)
  ENV.fetch(name) { raise "environment variable #{name} is not set" }
end

def connect
  PG.connect(host: env('O7S_HOST'), port: env('O7S_PORT').to_i, user: env('O7S_USER'),
             password: env('O7S_PASSWORD'), dbname: env('O7S_DB'), sslmode: 'disable', connect_timeout: 10)
end

def with_conn
  c = connect
  yield c
ensure
  c&.close
end

def check(cond, what)
  raise CheckFailed, what unless cond
end

def eq(got, want, what)
  raise CheckFailed, "#{what}: got #{got.inspect}, want #{want.inspect}" unless got == want
end

# The error a block raises, which must be a PG::Error.
def rejects(what)
  yield
  raise CheckFailed, "#{what} did not fail"
rescue PG::Error => e
  e
end

def sqlstate(e)
  e.result&.error_field(PG::PG_DIAG_SQLSTATE)
end

def setup
  with_conn do |c|
    c.exec("DROP TABLE IF EXISTS #{TABLE}")
    c.exec("CREATE TABLE #{TABLE} (id int PRIMARY KEY, name text NOT NULL, score int NOT NULL DEFAULT 0)")
  end
end

def prepared_statements
  with_conn do |c|
    c.exec("DELETE FROM #{TABLE}")
    all = (0..255).map(&:chr).join.b
    20.times do |i|
      r = c.exec_params('SELECT $1::int * 2 AS d, $2::text AS t, $3::bytea AS b, $4::int AS n',
                        [i, "é\n'#{i}", { value: all, format: 1 }, nil])
      row = r[0]
      eq([row['d'], row['t'], row['n']], [(i * 2).to_s, "é\n'#{i}", nil], 'round trip')
      eq(c.unescape_bytea(row['b']), all, 'all byte values')
    end
    # Binary results.
    r = c.exec_params('SELECT $1::bytea AS b', [{ value: all, format: 1 }], 1)
    eq(r.getvalue(0, 0).b, all, 'a binary result')
    # Named statements prepared once, run in many transactions: in transaction mode each may be on
    # another backend, where O7s must prepare them again.
    c.prepare('ins', "INSERT INTO #{TABLE} (id, name) VALUES ($1, $2)")
    c.prepare('count', "SELECT count(*)::int AS n FROM #{TABLE}")
    eq(c.describe_prepared('ins').nparams, 2, 'describe_prepared')
    10.times do |t|
      c.transaction do
        3.times do |k|
          id = t * 3 + k
          eq(c.exec_prepared('ins', [id, "p#{id}"]).cmd_tuples, 1, 'rows inserted')
        end
        eq(c.exec_prepared('count')[0]['n'].to_i, t * 3 + 3, 'rows inside the transaction')
        check(c.exec('SELECT count(*)::int AS n FROM pg_prepared_statements')[0]['n'].to_i >= 1,
              'a statement is prepared on the backend')
      end
    end
    # Single-row mode.
    c.send_query_params("SELECT id FROM #{TABLE} ORDER BY id", [])
    c.set_single_row_mode
    seen = []
    while (res = c.get_result)
      res.check
      res.each { |row| seen << row['id'].to_i }
    end
    eq(seen, (0...30).to_a, 'rows read in single-row mode')
  end
end

def transactions
  with_conn do |c|
    c.exec("DELETE FROM #{TABLE}")
    c.transaction { c.exec("INSERT INTO #{TABLE} (id, name) VALUES (1, 'kept')") }
    c.transaction do
      c.exec("INSERT INTO #{TABLE} (id, name) VALUES (2, 'dropped')")
      raise PG::Error, 'rolled back on purpose'
    end rescue PG::Error
    c.transaction do
      c.exec("INSERT INTO #{TABLE} (id, name) VALUES (3, 'outer')")
      c.exec('SAVEPOINT sp')
      c.exec("INSERT INTO #{TABLE} (id, name) VALUES (4, 'in savepoint')")
      c.exec('ROLLBACK TO SAVEPOINT sp')
      c.exec("INSERT INTO #{TABLE} (id, name) VALUES (5, 'after savepoint')")
    end
    # An error in a transaction aborts it until ROLLBACK.
    c.exec('BEGIN')
    eq(c.transaction_status, PG::PQTRANS_INTRANS, 'transaction status')
    e = rejects('division by zero') { c.exec('SELECT 1 / 0') }
    check(e.is_a?(PG::DivisionByZero), "error class #{e.class}")
    eq(c.transaction_status, PG::PQTRANS_INERROR, 'transaction status after the error')
    e = rejects('a query in an aborted transaction') { c.exec('SELECT 1') }
    eq(sqlstate(e), '25P02', 'sqlstate in the aborted transaction')
    c.exec('ROLLBACK')
    eq(c.transaction_status, PG::PQTRANS_IDLE, 'transaction status after ROLLBACK')
    eq(c.exec("SELECT array_agg(id ORDER BY id)::text AS ids FROM #{TABLE}")[0]['ids'], '{1,3,5}', 'committed rows')
    # A multi-statement simple query is one implicit transaction.
    rejects('multi-statement error') { c.exec("INSERT INTO #{TABLE} (id, name) VALUES (6, 'x'); SELECT 1 / 0") }
    eq(c.exec("SELECT count(*)::int AS n FROM #{TABLE} WHERE id = 6")[0]['n'], '0', 'the failed multi-statement query left nothing')
  end
end

def copy
  with_conn do |c|
    c.exec("DELETE FROM #{TABLE}")
    lines = (0...COPY_ROWS).map { |i| "#{i}\tc#{i}\t#{i % 7}\n" }
    c.copy_data("COPY #{TABLE} (id, name, score) FROM STDIN") { lines.each { |l| c.put_copy_data(l) } }
    r = c.exec("SELECT count(*)::int AS n, sum(score)::int AS s FROM #{TABLE}")[0]
    eq([r['n'].to_i, r['s'].to_i], [COPY_ROWS, (0...COPY_ROWS).sum { |i| i % 7 }], 'rows copied in')
    out = +''
    c.copy_data("COPY (SELECT id, name, score FROM #{TABLE} ORDER BY id) TO STDOUT") do
      while (row = c.get_copy_data)
        out << row
      end
    end
    eq(out, lines.join, 'rows copied out')
    # COPY in a transaction after a SET, then rolled back.
    c.exec('BEGIN')
    c.exec("SET LOCAL work_mem = '8MB'")
    c.copy_data("COPY #{TABLE} (id, name, score) FROM STDIN") { c.put_copy_data("100000\tx\t1\n") }
    c.exec('ROLLBACK')
    # A bad row fails the COPY; the connection goes on.
    e = rejects('a COPY of a duplicate key') do
      c.copy_data("COPY #{TABLE} (id, name, score) FROM STDIN") { c.put_copy_data("1\tdup\t0\n") }
    end
    eq(sqlstate(e), '23505', 'sqlstate of the failed COPY')
    eq(c.exec("SELECT count(*)::int AS n FROM #{TABLE}")[0]['n'].to_i, COPY_ROWS, 'rows after the failed COPY')
  end
end

def error_then_usable
  with_conn do |c|
    c.exec("DELETE FROM #{TABLE} WHERE id < 0")
    c.exec("INSERT INTO #{TABLE} (id, name) VALUES (-1, 'unique')")
    c.prepare('dup', "INSERT INTO #{TABLE} (id, name) VALUES ($1, $2)")
    e = rejects('a duplicate key') { c.exec_prepared('dup', [-1, 'again']) }
    check(e.is_a?(PG::UniqueViolation), "error class #{e.class}")
    eq([e.result.error_field(PG::PG_DIAG_CONSTRAINT_NAME), e.result.error_field(PG::PG_DIAG_TABLE_NAME)],
       ["#{TABLE}_pkey", TABLE], 'error fields')
    e = rejects('a bad cast') { c.exec_params('SELECT $1::int', ['nope']) }
    eq(sqlstate(e), '22P02', 'sqlstate of the bad cast')
    e = rejects('a syntax error') { c.exec('SELEC 1') }
    eq([sqlstate(e), e.result.error_field(PG::PG_DIAG_STATEMENT_POSITION)], ['42601', '1'], 'syntax error fields')
    e = rejects('an unknown table') { c.exec('SELECT * FROM no_such_table') }
    check(e.is_a?(PG::UndefinedTable), "error class #{e.class}")
    e = rejects('an unknown statement') { c.exec_prepared('no_such_statement', []) }
    eq(sqlstate(e), '26000', 'sqlstate of the unknown statement')
    # A NOTICE reaches the notice receiver; the named statement works after its error.
    notices = []
    c.set_notice_receiver { |r| notices << r.error_field(PG::PG_DIAG_MESSAGE_PRIMARY) }
    c.exec("DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$")
    eq(notices, ['hello 42'], 'notices')
    eq(c.exec_prepared('dup', [-2, 'fresh']).cmd_tuples, 1, 'the named statement after its error')
    eq(c.exec("SELECT 'after' AS a").values, [['after']], 'usable after the errors')
  end
end

def cancel
  with_conn do |c|
    # PG::Connection#cancel (a CancelRequest on a new connection) from another thread.
    2.times do |i|
      t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      worker = Thread.new { rejects('the cancelled query') { c.exec('SELECT pg_sleep(10)') } }
      sleep CANCEL_AFTER_S
      check(worker.alive?, "cancel #{i}: the query ended before its cancel was sent")
      eq(c.cancel, nil, 'cancel sent')
      check(worker.join(CANCELLED_WITHIN_S), "cancel #{i}: the query still runs #{CANCELLED_WITHIN_S} s after the cancel")
      e = worker.value
      eq(sqlstate(e), QUERY_CANCELED, 'sqlstate of the cancelled query')
      check(e.is_a?(PG::QueryCanceled), "error class #{e.class}")
      took = Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
      check(took < CANCEL_AFTER_S + CANCELLED_WITHIN_S, "the cancel took #{took} s")
      eq(c.exec("SELECT 'after cancel' AS a").values, [['after cancel']], 'usable after the cancel')
    end
    # A statement timeout for one transaction.
    c.exec('BEGIN')
    c.exec("SET LOCAL statement_timeout = '200ms'")
    e = rejects('the statement timeout') { c.exec('SELECT pg_sleep(5)') }
    eq(sqlstate(e), QUERY_CANCELED, 'sqlstate of the statement timeout')
    c.exec('ROLLBACK')
    eq(c.transaction_status, PG::PQTRANS_IDLE, 'idle after the timed-out transaction')
    eq(c.exec('SELECT 1 AS one').values, [['1']], 'usable after the timeout')
  end
end

def pool_concurrent
  with_conn { |c| c.exec("DELETE FROM #{TABLE}") }
  threads = (0...WORKERS).map do |w|
    Thread.new do
      with_conn do |c|
        c.prepare('ins', "INSERT INTO #{TABLE} (id, name, score) VALUES ($1, $2, $3)")
        ROUNDS.times do |r|
          c.transaction do
            c.exec_prepared('ins', [w * 1000 + r, "w#{w}", w])
            n = c.exec_params("SELECT count(*)::int AS n FROM #{TABLE} WHERE score = $1", [w])[0]['n'].to_i
            eq(n, r + 1, "worker #{w}'s rows inside its transaction")
          end
        end
        ROUNDS
      end
    end
  end
  eq(threads.sum { |t| t.value }, WORKERS * ROUNDS, 'transactions done')
  with_conn do |c|
    r = c.exec("SELECT count(*)::int AS n, count(DISTINCT score)::int AS w FROM #{TABLE}")[0]
    eq([r['n'].to_i, r['w'].to_i], [WORKERS * ROUNDS, WORKERS], 'rows from all workers')
  end
end

STEPS = {
  'setup' => method(:setup), 'prepared_statements' => method(:prepared_statements),
  'transactions' => method(:transactions), 'copy' => method(:copy),
  'error_then_usable' => method(:error_then_usable), 'cancel' => method(:cancel),
  'pool_concurrent' => method(:pool_concurrent),
}.freeze

$stdout.sync = true
(ARGV.empty? ? STEPS.keys : ARGV).each do |name|
  step = STEPS[name]
  result =
    if step.nil?
      "fail\tno such step"
    else
      begin
        Timeout.timeout(STEP_LIMIT_S) { step.call }
        'ok'
      rescue Exception => e # rubocop:disable Lint/RescueException -- every failure is reported, Timeout's too
        "fail\t#{"#{e.class}: #{e.message}".gsub(/[\r\n\t]+/, ' ')}"
      end
    end
  puts "RESULT\t#{name}\t#{result}"
end
