// pgx v4 (Debian golang-github-jackc-pgx-v4-dev) through O7s: its default statement cache (every query a
// named, described statement), Prepare, all byte values, batches (SendBatch), transactions with
// savepoints and rollback, CopyFrom and pgconn's CopyFrom/CopyTo, errors with their fields and the
// connection staying usable, a cancel (pgconn CancelRequest) and statement_timeout, and a pgxpool used
// at once by several goroutines. Built (GOPATH mode, offline) and run by tests/test_clients_go.py;
// prints one RESULT line per step (tests/clients/harness.py).
package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgx/v4"
	"github.com/jackc/pgx/v4/pgxpool"
)

const (
	table           = "go_pgx_item"
	stepLimit       = 30 * time.Second // each step is bounded in time
	copyRows        = 2000
	batchRows       = 200
	workers         = 6  // connections at once (the enterprise tier's backend pool is 50)
	rounds          = 20 // transactions per worker
	cancelAfter     = 500 * time.Millisecond
	cancelledWithin = 5 * time.Second
	queryCanceled   = "57014"
)

func dsn() string {
	return fmt.Sprintf("host=%s port=%s user=%s password=%s dbname=%s sslmode=disable connect_timeout=10",
		os.Getenv("O7S_HOST"), os.Getenv("O7S_PORT"), os.Getenv("O7S_USER"), os.Getenv("O7S_PASSWORD"), os.Getenv("O7S_DB"))
}

type failure string

func check(cond bool, format string, args ...any) {
	if !cond {
		panic(failure(fmt.Sprintf(format, args...)))
	}
}

func must(err error, what string) {
	if err != nil {
		panic(failure(fmt.Sprintf("%s: %v", what, err)))
	}
}

func pgErr(err error, what string) *pgconn.PgError {
	var pe *pgconn.PgError
	check(err != nil, "%s did not fail", what)
	check(errors.As(err, &pe), "%s: not a server error: %v", what, err)
	return pe
}

func withConn(ctx context.Context, fn func(c *pgx.Conn)) {
	c, err := pgx.Connect(ctx, dsn())
	must(err, "connect")
	defer c.Close(context.Background())
	fn(c)
}

func count(ctx context.Context, c *pgx.Conn, sql string, args ...any) int {
	var n int
	must(c.QueryRow(ctx, sql, args...).Scan(&n), sql)
	return n
}

func exec(ctx context.Context, c *pgx.Conn, sql string, args ...any) {
	_, err := c.Exec(ctx, sql, args...)
	must(err, sql)
}

func setup(ctx context.Context) {
	withConn(ctx, func(c *pgx.Conn) {
		exec(ctx, c, "DROP TABLE IF EXISTS "+table)
		exec(ctx, c, "CREATE TABLE "+table+" (id int PRIMARY KEY, name text NOT NULL, score int NOT NULL DEFAULT 0)")
	})
}

func preparedStatements(ctx context.Context) {
	withConn(ctx, func(c *pgx.Conn) {
		exec(ctx, c, "DELETE FROM "+table)
		all := make([]byte, 256)
		for i := range all {
			all[i] = byte(i)
		}
		for i := 0; i < 20; i++ {
			var d int
			var t string
			var b []byte
			var n *int
			must(c.QueryRow(ctx, "SELECT $1::int * 2, $2::text, $3::bytea, $4::int", i, fmt.Sprintf("é\n'%d", i), all, nil).Scan(&d, &t, &b, &n), "round trip")
			check(d == i*2 && t == fmt.Sprintf("é\n'%d", i) && n == nil, "round trip: %d %q %v", d, t, n)
			check(bytes.Equal(b, all), "all byte values")
		}
		_, err := c.Prepare(ctx, "ins", "INSERT INTO "+table+" (id, name) VALUES ($1, $2)")
		must(err, "prepare")
		// The same named statements in many transactions: in transaction mode each may be on another
		// backend, where O7s must prepare them again.
		for t := 0; t < 10; t++ {
			tx, err := c.Begin(ctx)
			must(err, "begin")
			for k := 0; k < 3; k++ {
				id := t*3 + k
				tag, err := tx.Exec(ctx, "ins", id, fmt.Sprintf("p%d", id))
				must(err, "insert")
				check(tag.RowsAffected() == 1, "rows inserted: %d", tag.RowsAffected())
			}
			var n int
			must(tx.QueryRow(ctx, "SELECT count(*) FROM "+table).Scan(&n), "count")
			check(n == t*3+3, "rows inside the transaction: %d", n)
			must(tx.QueryRow(ctx, "SELECT count(*) FROM pg_prepared_statements").Scan(&n), "prepared statements")
			check(n >= 1, "a statement is prepared on the backend")
			must(tx.Commit(ctx), "commit")
		}
		rows, err := c.Query(ctx, "SELECT id FROM "+table+" ORDER BY id")
		must(err, "query")
		seen := 0
		for rows.Next() {
			var id int
			must(rows.Scan(&id), "scan")
			check(id == seen, "row %d is %d", seen, id)
			seen++
		}
		must(rows.Err(), "rows")
		check(seen == 30, "rows read: %d", seen)
	})
}

func batches(ctx context.Context) {
	withConn(ctx, func(c *pgx.Conn) {
		exec(ctx, c, "DELETE FROM "+table)
		b := &pgx.Batch{}
		for i := 0; i < batchRows; i++ {
			b.Queue("INSERT INTO "+table+" (id, name, score) VALUES ($1, $2, $3)", i, fmt.Sprintf("b%d", i), i%5)
		}
		b.Queue("SELECT count(*) FROM " + table)
		br := c.SendBatch(ctx, b)
		for i := 0; i < batchRows; i++ {
			tag, err := br.Exec()
			must(err, "batch insert")
			check(tag.RowsAffected() == 1, "batch row %d", i)
		}
		var n int
		must(br.QueryRow().Scan(&n), "batch count")
		check(n == batchRows, "count inside the batch: %d", n)
		must(br.Close(), "batch close")
		// A batch with an error: the rest of it is not run, the connection goes on.
		b = &pgx.Batch{}
		b.Queue("INSERT INTO "+table+" (id, name) VALUES ($1, 'x')", 100000)
		b.Queue("INSERT INTO "+table+" (id, name) VALUES ($1, 'dup')", 0)
		b.Queue("INSERT INTO "+table+" (id, name) VALUES ($1, 'x')", 100001)
		br = c.SendBatch(ctx, b)
		_, err := br.Exec()
		must(err, "first of the failing batch")
		_, err = br.Exec()
		check(pgErr(err, "a duplicate key in a batch").Code == "23505", "sqlstate of the failed batch")
		br.Close()
		check(count(ctx, c, "SELECT count(*) FROM "+table+" WHERE id >= 100000") == 0, "the failed batch left nothing")
	})
}

func transactions(ctx context.Context) {
	withConn(ctx, func(c *pgx.Conn) {
		exec(ctx, c, "DELETE FROM "+table)
		must(c.BeginFunc(ctx, func(tx pgx.Tx) error {
			_, err := tx.Exec(ctx, "INSERT INTO "+table+" (id, name) VALUES (1, 'kept')")
			return err
		}), "committed transaction")
		tx, err := c.Begin(ctx)
		must(err, "begin")
		_, err = tx.Exec(ctx, "INSERT INTO "+table+" (id, name) VALUES (2, 'dropped')")
		must(err, "insert")
		must(tx.Rollback(ctx), "rollback")
		tx, err = c.Begin(ctx)
		must(err, "begin")
		_, err = tx.Exec(ctx, "INSERT INTO "+table+" (id, name) VALUES (3, 'outer')")
		must(err, "insert")
		sp, err := tx.Begin(ctx) // a savepoint
		must(err, "savepoint")
		_, err = sp.Exec(ctx, "INSERT INTO "+table+" (id, name) VALUES (4, 'in savepoint')")
		must(err, "insert")
		must(sp.Rollback(ctx), "rollback to savepoint")
		_, err = tx.Exec(ctx, "INSERT INTO "+table+" (id, name) VALUES (5, 'after savepoint')")
		must(err, "insert")
		must(tx.Commit(ctx), "commit")
		// An error aborts the transaction until rollback.
		tx, err = c.Begin(ctx)
		must(err, "begin")
		_, err = tx.Exec(ctx, "SELECT 1 / 0")
		check(pgErr(err, "division by zero").Code == "22012", "sqlstate")
		_, err = tx.Exec(ctx, "SELECT 1")
		check(pgErr(err, "a query in an aborted transaction").Code == "25P02", "sqlstate in the aborted transaction")
		must(tx.Rollback(ctx), "rollback")
		// Isolation level through TxOptions.
		tx, err = c.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.Serializable, AccessMode: pgx.ReadOnly})
		must(err, "begin serializable")
		var iso string
		must(tx.QueryRow(ctx, "SHOW transaction_isolation").Scan(&iso), "show")
		check(iso == "serializable", "isolation level %q", iso)
		_, err = tx.Exec(ctx, "INSERT INTO "+table+" (id, name) VALUES (9, 'read only')")
		check(pgErr(err, "a write in a read-only transaction").Code == "25006", "sqlstate of the read-only write")
		must(tx.Rollback(ctx), "rollback")
		var ids string
		must(c.QueryRow(ctx, "SELECT string_agg(id::text, ',' ORDER BY id) FROM "+table).Scan(&ids), "ids")
		check(ids == "1,3,5", "committed rows: %s", ids)
	})
}

func copyInOut(ctx context.Context) {
	withConn(ctx, func(c *pgx.Conn) {
		exec(ctx, c, "DELETE FROM "+table)
		rows := make([][]any, copyRows)
		sum := 0
		var lines strings.Builder
		for i := range rows {
			rows[i] = []any{int32(i), fmt.Sprintf("c%d", i), int32(i % 7)}
			sum += i % 7
			fmt.Fprintf(&lines, "%d\tc%d\t%d\n", i, i, i%7)
		}
		// pgx's CopyFrom (binary COPY).
		n, err := c.CopyFrom(ctx, pgx.Identifier{table}, []string{"id", "name", "score"}, pgx.CopyFromRows(rows))
		must(err, "CopyFrom")
		check(n == copyRows, "rows copied in (reported): %d", n)
		check(count(ctx, c, "SELECT sum(score) FROM "+table) == sum, "sum copied in")
		var out bytes.Buffer
		tag, err := c.PgConn().CopyTo(ctx, &out, "COPY (SELECT id, name, score FROM "+table+" ORDER BY id) TO STDOUT")
		must(err, "CopyTo")
		check(tag.RowsAffected() == copyRows, "rows copied out (reported): %d", tag.RowsAffected())
		check(out.String() == lines.String(), "rows copied out")
		// Text COPY in through pgconn, in a transaction, rolled back.
		exec(ctx, c, "BEGIN")
		_, err = c.PgConn().CopyFrom(ctx, strings.NewReader("100000\tx\t1\n"), "COPY "+table+" (id, name, score) FROM STDIN")
		must(err, "text COPY in")
		exec(ctx, c, "ROLLBACK")
		// A bad row fails the COPY; the connection goes on.
		_, err = c.PgConn().CopyFrom(ctx, strings.NewReader("1\tdup\t0\n"), "COPY "+table+" (id, name, score) FROM STDIN")
		check(pgErr(err, "a COPY of a duplicate key").Code == "23505", "sqlstate of the failed COPY")
		check(count(ctx, c, "SELECT count(*) FROM "+table) == copyRows, "rows after the failed COPY")
	})
}

func errorThenUsable(ctx context.Context) {
	withConn(ctx, func(c *pgx.Conn) {
		exec(ctx, c, "DELETE FROM "+table+" WHERE id < 0")
		exec(ctx, c, "INSERT INTO "+table+" (id, name) VALUES (-1, 'unique')")
		_, err := c.Exec(ctx, "INSERT INTO "+table+" (id, name) VALUES ($1, $2)", -1, "again")
		pe := pgErr(err, "a duplicate key")
		check(pe.Code == "23505" && pe.ConstraintName == table+"_pkey" && pe.TableName == table, "error fields: %+v", pe)
		var i int
		err = c.QueryRow(ctx, "SELECT $1::text::int", "nope").Scan(&i)
		check(pgErr(err, "a bad cast").Code == "22P02", "sqlstate of the bad cast")
		_, err = c.Exec(ctx, "SELEC 1")
		pe = pgErr(err, "a syntax error")
		check(pe.Code == "42601" && pe.Position == 1, "syntax error fields: %+v", pe)
		_, err = c.Exec(ctx, "SELECT * FROM no_such_table")
		check(pgErr(err, "an unknown table").Code == "42P01", "sqlstate of the unknown table")
		// The same (cached) statement after its error.
		tag, err := c.Exec(ctx, "INSERT INTO "+table+" (id, name) VALUES ($1, $2)", -2, "fresh")
		must(err, "the statement after its error")
		check(tag.RowsAffected() == 1, "rows inserted")
		check(count(ctx, c, "SELECT 7") == 7, "usable after the errors")
	})
	// A NOTICE reaches the OnNotice handler.
	cfg, err := pgx.ParseConfig(dsn())
	must(err, "config")
	var notices []string
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) { notices = append(notices, n.Severity+": "+n.Message) }
	c, err := pgx.ConnectConfig(ctx, cfg)
	must(err, "connect")
	defer c.Close(context.Background())
	exec(ctx, c, "DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$")
	check(len(notices) == 1 && notices[0] == "NOTICE: hello 42", "notices: %v", notices)
}

func cancel(ctx context.Context) {
	withConn(ctx, func(c *pgx.Conn) {
		// pgconn's CancelRequest (on a new connection) from another goroutine; the connection stays.
		for i := 0; i < 2; i++ {
			t0 := time.Now()
			done := make(chan error, 1)
			go func() { _, err := c.Exec(ctx, "SELECT pg_sleep(10)"); done <- err }()
			time.Sleep(cancelAfter)
			select {
			case err := <-done:
				panic(failure(fmt.Sprintf("cancel %d: the query ended before its cancel was sent: %v", i, err)))
			default:
			}
			must(c.PgConn().CancelRequest(ctx), "cancel request")
			select {
			case err := <-done:
				check(pgErr(err, "the cancelled query").Code == queryCanceled, "sqlstate of the cancelled query")
			case <-time.After(cancelledWithin):
				panic(failure(fmt.Sprintf("cancel %d: the query still runs %v after the cancel", i, cancelledWithin)))
			}
			check(time.Since(t0) < cancelAfter+cancelledWithin, "the cancel took %v", time.Since(t0))
			check(count(ctx, c, "SELECT 11") == 11, "usable after the cancel")
		}
		// statement_timeout for one transaction.
		tx, err := c.Begin(ctx)
		must(err, "begin")
		_, err = tx.Exec(ctx, "SET LOCAL statement_timeout = '200ms'")
		must(err, "set local")
		_, err = tx.Exec(ctx, "SELECT pg_sleep(5)")
		check(pgErr(err, "the statement timeout").Code == queryCanceled, "sqlstate of the statement timeout")
		must(tx.Rollback(ctx), "rollback")
		check(count(ctx, c, "SELECT 12") == 12, "usable after the statement timeout")
	})
	// A context deadline: pgx cancels and closes that connection; a new one works.
	withConn(ctx, func(c *pgx.Conn) {
		short, stop := context.WithTimeout(ctx, cancelAfter)
		defer stop()
		t0 := time.Now()
		_, err := c.Exec(short, "SELECT pg_sleep(10)")
		check(err != nil, "the query past its context deadline did not fail")
		check(time.Since(t0) < cancelledWithin, "the context deadline took %v", time.Since(t0))
	})
	withConn(ctx, func(c *pgx.Conn) { check(count(ctx, c, "SELECT 13") == 13, "a new connection after the deadline") })
}

func poolConcurrent(ctx context.Context) {
	withConn(ctx, func(c *pgx.Conn) { exec(ctx, c, "DELETE FROM "+table) })
	cfg, err := pgxpool.ParseConfig(dsn() + fmt.Sprintf(" pool_max_conns=%d", workers))
	must(err, "pool config")
	pool, err := pgxpool.ConnectConfig(ctx, cfg)
	must(err, "pool")
	defer pool.Close()
	var wg sync.WaitGroup
	errs := make(chan string, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			defer func() {
				if r := recover(); r != nil {
					errs <- fmt.Sprint(r)
				}
			}()
			for r := 0; r < rounds; r++ {
				must(pool.BeginFunc(ctx, func(tx pgx.Tx) error {
					if _, err := tx.Exec(ctx, "INSERT INTO "+table+" (id, name, score) VALUES ($1, $2, $3)", w*1000+r, fmt.Sprintf("w%d", w), w); err != nil {
						return err
					}
					var n int
					if err := tx.QueryRow(ctx, "SELECT count(*) FROM "+table+" WHERE score = $1", w).Scan(&n); err != nil {
						return err
					}
					check(n == r+1, "worker %d's rows inside its transaction: %d", w, n)
					return nil
				}), "pool transaction")
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		panic(failure(e))
	}
	var n, ws int
	must(pool.QueryRow(ctx, "SELECT count(*), count(DISTINCT score) FROM "+table).Scan(&n, &ws), "totals")
	check(n == workers*rounds && ws == workers, "rows from all workers: %d from %d", n, ws)
}

var oneLine = regexp.MustCompile(`[\r\n\t]+`)

func run(name string, fn func(context.Context)) (result string) {
	ctx, stop := context.WithTimeout(context.Background(), stepLimit)
	defer stop()
	done := make(chan string, 1)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				done <- "fail\t" + oneLine.ReplaceAllString(fmt.Sprint(r), " ")
			}
		}()
		fn(ctx)
		done <- "ok"
	}()
	select {
	case r := <-done:
		return r
	case <-time.After(stepLimit + time.Second):
		return fmt.Sprintf("fail\ttimed out after %v", stepLimit)
	}
}

func main() {
	steps := []struct {
		name string
		fn   func(context.Context)
	}{
		{"setup", setup}, {"prepared_statements", preparedStatements}, {"batches", batches},
		{"transactions", transactions}, {"copy", copyInOut}, {"error_then_usable", errorThenUsable},
		{"cancel", cancel}, {"pool_concurrent", poolConcurrent},
	}
	chosen := os.Args[1:]
	if len(chosen) == 0 {
		for _, s := range steps {
			chosen = append(chosen, s.name)
		}
	}
	for _, name := range chosen {
		result := "fail\tno such step"
		for _, s := range steps {
			if s.name == name {
				result = run(name, s.fn)
			}
		}
		fmt.Printf("RESULT\t%s\t%s\n", name, result)
	}
}
