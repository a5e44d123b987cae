// pgjdbc (Debian's libpostgresql-jdbc-java) through O7s: server-side prepared statements
// (prepareThreshold=1), batches, transactions with savepoints and rollback, COPY in and out through
// CopyManager, errors with the connection staying usable, Statement.cancel() and setQueryTimeout,
// DatabaseMetaData, and several connections used at once. Compiled and run by
// tests/test_clients_java.py; prints one RESULT line per step (tests/clients/harness.py).

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.Callable;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;
import org.postgresql.util.PSQLException;

public final class JdbcWorkload {
    static final String TABLE = "java_jdbc_item";
    static final long STEP_LIMIT_S = 30; // each step is bounded in time
    static final int COPY_ROWS = 2000;
    static final int BATCH_ROWS = 500;
    static final int WORKERS = 6; // connections at once (the enterprise tier's backend pool is 50)
    static final int ROUNDS = 20; // transactions per worker
    static final long CANCEL_AFTER_MS = 500;
    static final long CANCELLED_WITHIN_MS = 5000;
    static final String QUERY_CANCELED = "57014";

    interface Step { void run() throws Exception; }

    static String env(String name) {
        String v = System.getenv(name);
        if (v == null) throw new IllegalStateException("environment variable " + name + " is not set");
        return v;
    }

    static Connection connect() throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", env("O7S_USER"));
        p.setProperty("password", env("O7S_PASSWORD"));
        p.setProperty("sslmode", "disable");
        p.setProperty("prepareThreshold", "1"); // named server-side statements from the first run
        p.setProperty("connectTimeout", "10");
        String url = "jdbc:postgresql://" + env("O7S_HOST") + ":" + env("O7S_PORT") + "/" + env("O7S_DB");
        return DriverManager.getConnection(url, p);
    }

    static void check(boolean cond, String what) {
        if (!cond) throw new AssertionError(what);
    }

    static void eq(Object got, Object want, String what) {
        if (!java.util.Objects.equals(got, want)) throw new AssertionError(what + ": got " + got + ", want " + want);
    }

    static String sqlState(Step s, String what) throws Exception {
        try {
            s.run();
        } catch (SQLException e) {
            return e.getSQLState();
        }
        throw new AssertionError(what + " did not fail");
    }

    static long scalar(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            check(rs.next(), "a row from " + sql);
            return rs.getLong(1);
        }
    }

    static void exec(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement()) {
            st.execute(sql);
        }
    }

    static void setup() throws Exception {
        try (Connection c = connect()) {
            exec(c, "DROP TABLE IF EXISTS " + TABLE);
            exec(c, "CREATE TABLE " + TABLE + " (id int PRIMARY KEY, name text NOT NULL, score int NOT NULL DEFAULT 0)");
        }
    }

    static void preparedStatements() throws Exception {
        try (Connection c = connect()) {
            exec(c, "DELETE FROM " + TABLE);
            byte[] all = new byte[256];
            for (int i = 0; i < all.length; i++) all[i] = (byte) i;
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int * 2, ?::text, ?::bytea, ?::int")) {
                for (int i = 0; i < 20; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "é\n'" + i);
                    ps.setBytes(3, all);
                    ps.setNull(4, java.sql.Types.INTEGER);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next(), "a row");
                        eq(rs.getInt(1), i * 2, "int round trip");
                        eq(rs.getString(2), "é\n'" + i, "text round trip");
                        check(Arrays.equals(rs.getBytes(3), all), "all byte values");
                        rs.getInt(4);
                        check(rs.wasNull(), "null round trip");
                    }
                    check(ps.unwrap(org.postgresql.PGStatement.class).isUseServerPrepare(), "a server-side prepare");
                }
            }
            // The same named statements in many transactions: in transaction mode each may be on
            // another backend, where O7s must prepare them again.
            c.setAutoCommit(false);
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + TABLE + " (id, name) VALUES (?, ?)");
                 PreparedStatement cnt = c.prepareStatement("SELECT count(*) FROM " + TABLE)) {
                for (int t = 0; t < 10; t++) {
                    for (int k = 0; k < 3; k++) {
                        int id = t * 3 + k;
                        ins.setInt(1, id);
                        ins.setString(2, "p" + id);
                        eq(ins.executeUpdate(), 1, "rows inserted");
                    }
                    try (ResultSet rs = cnt.executeQuery()) {
                        rs.next();
                        eq(rs.getInt(1), t * 3 + 3, "rows inside the transaction");
                    }
                    check(scalar(c, "SELECT count(*) FROM pg_prepared_statements") >= 1, "a statement is prepared on the backend");
                    c.commit();
                }
            }
            // A fetch size makes pgjdbc read through a portal in several Executes (inside a transaction).
            try (PreparedStatement ps = c.prepareStatement("SELECT id FROM " + TABLE + " ORDER BY id")) {
                ps.setFetchSize(7);
                List<Integer> seen = new ArrayList<>();
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) seen.add(rs.getInt(1));
                }
                eq(seen.size(), 30, "rows read 7 at a time");
                eq(seen.get(29), 29, "the last row read");
            }
            c.commit();
        }
    }

    static void batches() throws Exception {
        try (Connection c = connect()) {
            exec(c, "DELETE FROM " + TABLE);
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + TABLE + " (id, name, score) VALUES (?, ?, ?)")) {
                for (int i = 0; i < BATCH_ROWS; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, "b" + i);
                    ps.setInt(3, i % 5);
                    ps.addBatch();
                }
                int[] counts = ps.executeBatch();
                eq(counts.length, BATCH_ROWS, "batch results");
                for (int n : counts) check(n == 1 || n == Statement.SUCCESS_NO_INFO, "a batch row count " + n);
            }
            c.commit();
            eq(scalar(c, "SELECT count(*) FROM " + TABLE), (long) BATCH_ROWS, "rows after the batch");
            c.commit();
            // A batch with a duplicate key fails as a whole in its transaction.
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + TABLE + " (id, name) VALUES (?, ?)")) {
                for (int id : new int[] {100000, 100001, 0, 100002}) {
                    ps.setInt(1, id);
                    ps.setString(2, "dup");
                    ps.addBatch();
                }
                try {
                    ps.executeBatch();
                    throw new AssertionError("a batch with a duplicate key did not fail");
                } catch (BatchUpdateException e) {
                    eq(e.getSQLState(), "23505", "sqlstate of the failed batch");
                }
            }
            c.rollback();
            eq(scalar(c, "SELECT count(*) FROM " + TABLE), (long) BATCH_ROWS, "rows after the failed batch");
            c.commit();
            // A statement batch (simple statements).
            try (Statement st = c.createStatement()) {
                st.addBatch("UPDATE " + TABLE + " SET score = score + 1 WHERE id < 10");
                st.addBatch("DELETE FROM " + TABLE + " WHERE id >= 400");
                int[] counts = st.executeBatch();
                eq(Arrays.toString(counts), "[10, 100]", "statement batch counts");
            }
            c.commit();
        }
    }

    static void transactions() throws Exception {
        try (Connection c = connect()) {
            exec(c, "DELETE FROM " + TABLE);
            c.setAutoCommit(false);
            exec(c, "INSERT INTO " + TABLE + " (id, name) VALUES (1, 'kept')");
            c.commit();
            exec(c, "INSERT INTO " + TABLE + " (id, name) VALUES (2, 'dropped')");
            c.rollback();
            exec(c, "INSERT INTO " + TABLE + " (id, name) VALUES (3, 'outer')");
            Savepoint sp = c.setSavepoint("sp");
            exec(c, "INSERT INTO " + TABLE + " (id, name) VALUES (4, 'in savepoint')");
            c.rollback(sp);
            exec(c, "INSERT INTO " + TABLE + " (id, name) VALUES (5, 'after savepoint')");
            c.commit();
            // An error aborts the transaction until rollback.
            eq(sqlState(() -> scalar(c, "SELECT 1 / 0"), "division by zero"), "22012", "sqlstate");
            eq(sqlState(() -> scalar(c, "SELECT 1"), "a query in an aborted transaction"), "25P02", "sqlstate in the aborted transaction");
            c.rollback();
            // Isolation level and read-only, set through the driver.
            c.setTransactionIsolation(Connection.TRANSACTION_SERIALIZABLE);
            try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery("SHOW transaction_isolation")) {
                rs.next();
                eq(rs.getString(1), "serializable", "isolation level");
            }
            c.commit();
            c.setTransactionIsolation(Connection.TRANSACTION_READ_COMMITTED);
            c.setAutoCommit(true);
            try (Statement st = c.createStatement();
                 ResultSet rs = st.executeQuery("SELECT string_agg(id::text, ',' ORDER BY id) FROM " + TABLE)) {
                rs.next();
                eq(rs.getString(1), "1,3,5", "committed rows");
            }
        }
    }

    static void copy() throws Exception {
        try (Connection c = connect()) {
            exec(c, "DELETE FROM " + TABLE);
            CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder lines = new StringBuilder();
            long sum = 0;
            for (int i = 0; i < COPY_ROWS; i++) {
                lines.append(i).append('\t').append('c').append(i).append('\t').append(i % 7).append('\n');
                sum += i % 7;
            }
            long in = cm.copyIn("COPY " + TABLE + " (id, name, score) FROM STDIN", new StringReader(lines.toString()));
            eq(in, (long) COPY_ROWS, "rows copied in (reported)");
            eq(scalar(c, "SELECT count(*) FROM " + TABLE), (long) COPY_ROWS, "rows copied in");
            eq(scalar(c, "SELECT sum(score) FROM " + TABLE), sum, "sum copied in");
            StringWriter out = new StringWriter();
            long n = cm.copyOut("COPY (SELECT id, name, score FROM " + TABLE + " ORDER BY id) TO STDOUT", out);
            eq(n, (long) COPY_ROWS, "rows copied out (reported)");
            eq(out.toString(), lines.toString(), "rows copied out");
            // COPY in a transaction, rolled back.
            c.setAutoCommit(false);
            cm.copyIn("COPY " + TABLE + " (id, name, score) FROM STDIN", new StringReader("100000\tx\t1\n"));
            c.rollback();
            c.setAutoCommit(true);
            // A bad row fails the COPY; the connection goes on.
            eq(sqlState(() -> cm.copyIn("COPY " + TABLE + " (id, name, score) FROM STDIN", new StringReader("1\tdup\t0\n")),
                "a COPY of a duplicate key"), "23505", "sqlstate of the failed COPY");
            eq(scalar(c, "SELECT count(*) FROM " + TABLE), (long) COPY_ROWS, "rows after the failed COPY");
        }
    }

    static void errorThenUsable() throws Exception {
        try (Connection c = connect()) {
            exec(c, "DELETE FROM " + TABLE + " WHERE id < 0");
            exec(c, "INSERT INTO " + TABLE + " (id, name) VALUES (-1, 'unique')");
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO " + TABLE + " (id, name) VALUES (?, ?)")) {
                ps.setInt(1, -1);
                ps.setString(2, "again");
                try {
                    ps.executeUpdate();
                    throw new AssertionError("a duplicate key did not fail");
                } catch (PSQLException e) {
                    eq(e.getSQLState(), "23505", "sqlstate of the duplicate key");
                    eq(e.getServerErrorMessage().getConstraint(), TABLE + "_pkey", "constraint");
                    eq(e.getServerErrorMessage().getTable(), TABLE, "table");
                }
                // The same prepared statement after its error.
                ps.setInt(1, -2);
                ps.setString(2, "fresh");
                eq(ps.executeUpdate(), 1, "the prepared statement after its error");
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int")) {
                ps.setString(1, "nope");
                eq(sqlState(() -> ps.executeQuery().close(), "a bad cast"), "22P02", "sqlstate of the bad cast");
            }
            try {
                scalar(c, "SELEC 1");
                throw new AssertionError("a syntax error did not fail");
            } catch (PSQLException e) {
                eq(e.getSQLState(), "42601", "sqlstate of the syntax error");
                eq(e.getServerErrorMessage().getPosition(), 1, "position of the syntax error");
            }
            eq(sqlState(() -> scalar(c, "SELECT * FROM no_such_table"), "an unknown table"), "42P01", "sqlstate of the unknown table");
            // A NOTICE arrives as a warning.
            try (Statement st = c.createStatement()) {
                st.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$");
                check(st.getWarnings() != null, "a warning for the notice");
                eq(st.getWarnings().getMessage(), "hello 42", "the notice");
            }
            eq(scalar(c, "SELECT 7"), 7L, "usable after the errors");
        }
    }

    static void cancel() throws Exception {
        try (Connection c = connect()) {
            // Statement.cancel() from another thread (a CancelRequest on a new connection).
            ExecutorService ex = Executors.newSingleThreadExecutor();
            try (Statement st = c.createStatement()) {
                long t0 = System.nanoTime();
                Future<String> f = ex.submit(() -> sqlState(() -> st.execute("SELECT pg_sleep(10)"), "the cancelled query"));
                Thread.sleep(CANCEL_AFTER_MS);
                check(!f.isDone(), "the query ended before its cancel was sent");
                st.cancel();
                eq(f.get(CANCELLED_WITHIN_MS, TimeUnit.MILLISECONDS), QUERY_CANCELED, "sqlstate of the cancelled query");
                long ms = (System.nanoTime() - t0) / 1_000_000;
                check(ms < CANCEL_AFTER_MS + CANCELLED_WITHIN_MS, "the cancel took " + ms + " ms");
            } finally {
                ex.shutdownNow();
            }
            eq(scalar(c, "SELECT 11"), 11L, "usable after the cancel");
            // setQueryTimeout: pgjdbc cancels the statement itself when the time is up.
            try (Statement st = c.createStatement()) {
                st.setQueryTimeout(1);
                long t0 = System.nanoTime();
                eq(sqlState(() -> st.execute("SELECT pg_sleep(10)"), "the timed-out query"), QUERY_CANCELED, "sqlstate of the query timeout");
                long ms = (System.nanoTime() - t0) / 1_000_000;
                check(ms < CANCELLED_WITHIN_MS, "the query timeout took " + ms + " ms");
            }
            eq(scalar(c, "SELECT 12"), 12L, "usable after the query timeout");
            // statement_timeout for one transaction.
            c.setAutoCommit(false);
            exec(c, "SET LOCAL statement_timeout = '200ms'");
            eq(sqlState(() -> scalar(c, "SELECT pg_sleep(5)"), "the statement timeout"), QUERY_CANCELED, "sqlstate of the statement timeout");
            c.rollback();
            c.setAutoCommit(true);
            eq(scalar(c, "SELECT 13"), 13L, "usable after the statement timeout");
        }
    }

    static void metadata() throws Exception {
        try (Connection c = connect()) {
            DatabaseMetaData md = c.getMetaData();
            check(md.getDatabaseProductName().equals("PostgreSQL"), "product name " + md.getDatabaseProductName());
            check(md.getDatabaseMajorVersion() >= 12, "server major version " + md.getDatabaseMajorVersion());
            List<String> tables = new ArrayList<>();
            try (ResultSet rs = md.getTables(null, null, TABLE, new String[] {"TABLE"})) {
                while (rs.next()) tables.add(rs.getString("TABLE_NAME"));
            }
            eq(tables, List.of(TABLE), "getTables");
            Map<String, String> cols = new LinkedHashMap<>();
            try (ResultSet rs = md.getColumns(null, null, TABLE, null)) {
                while (rs.next()) cols.put(rs.getString("COLUMN_NAME"), rs.getString("TYPE_NAME"));
            }
            eq(cols.toString(), "{id=int4, name=text, score=int4}", "getColumns");
            List<String> pk = new ArrayList<>();
            try (ResultSet rs = md.getPrimaryKeys(null, null, TABLE)) {
                while (rs.next()) pk.add(rs.getString("COLUMN_NAME"));
            }
            eq(pk, List.of("id"), "getPrimaryKeys");
            try (ResultSet rs = md.getTypeInfo()) {
                int n = 0;
                while (rs.next()) n++;
                check(n > 20, "getTypeInfo rows: " + n);
            }
            // Result-set metadata of a prepared statement.
            try (PreparedStatement ps = c.prepareStatement("SELECT id, name FROM " + TABLE + " WHERE id = ?")) {
                eq(ps.getMetaData().getColumnName(2), "name", "prepared statement metadata");
                eq(ps.getParameterMetaData().getParameterCount(), 1, "parameter metadata");
            }
        }
    }

    static void poolConcurrent() throws Exception {
        try (Connection c = connect()) {
            exec(c, "DELETE FROM " + TABLE);
        }
        ExecutorService ex = Executors.newFixedThreadPool(WORKERS);
        try {
            List<Future<Integer>> fs = new ArrayList<>();
            for (int w = 0; w < WORKERS; w++) {
                final int worker = w;
                Callable<Integer> job = () -> {
                    try (Connection c = connect()) {
                        c.setAutoCommit(false);
                        try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + TABLE + " (id, name, score) VALUES (?, ?, ?)");
                             PreparedStatement own = c.prepareStatement("SELECT count(*) FROM " + TABLE + " WHERE score = ?")) {
                            for (int r = 0; r < ROUNDS; r++) {
                                ins.setInt(1, worker * 1000 + r);
                                ins.setString(2, "w" + worker);
                                ins.setInt(3, worker);
                                ins.executeUpdate();
                                own.setInt(1, worker);
                                try (ResultSet rs = own.executeQuery()) {
                                    rs.next();
                                    eq(rs.getInt(1), r + 1, "worker " + worker + "'s rows inside its transaction");
                                }
                                c.commit();
                            }
                        }
                        return ROUNDS;
                    }
                };
                fs.add(ex.submit(job));
            }
            int done = 0;
            for (Future<Integer> f : fs) done += f.get(STEP_LIMIT_S, TimeUnit.SECONDS);
            eq(done, WORKERS * ROUNDS, "transactions done");
        } finally {
            ex.shutdownNow();
        }
        try (Connection c = connect()) {
            eq(scalar(c, "SELECT count(*) FROM " + TABLE), (long) WORKERS * ROUNDS, "rows from all workers");
            eq(scalar(c, "SELECT count(DISTINCT score) FROM " + TABLE), (long) WORKERS, "workers seen");
        }
    }

    public static void main(String[] args) throws Exception {
        Map<String, Step> steps = new LinkedHashMap<>();
        steps.put("setup", JdbcWorkload::setup);
        steps.put("prepared_statements", JdbcWorkload::preparedStatements);
        steps.put("batches", JdbcWorkload::batches);
        steps.put("transactions", JdbcWorkload::transactions);
        steps.put("copy", JdbcWorkload::copy);
        steps.put("error_then_usable", JdbcWorkload::errorThenUsable);
        steps.put("cancel", JdbcWorkload::cancel);
        steps.put("metadata", JdbcWorkload::metadata);
        steps.put("pool_concurrent", JdbcWorkload::poolConcurrent);
        List<String> chosen = args.length > 0 ? Arrays.asList(args) : new ArrayList<>(steps.keySet());
        ExecutorService runner = Executors.newCachedThreadPool(r -> {
            Thread t = new Thread(r);
            t.setDaemon(true); // a step stuck past its limit does not keep the program alive
            return t;
        });
        for (String name : chosen) {
            Step s = steps.get(name);
            if (s == null) {
                System.out.println("RESULT\t" + name + "\tfail\tno such step");
                continue;
            }
            Future<?> f = runner.submit(() -> { s.run(); return null; });
            String result;
            try {
                f.get(STEP_LIMIT_S, TimeUnit.SECONDS);
                result = "ok";
            } catch (TimeoutException e) {
                f.cancel(true);
                result = "fail\ttimed out after " + STEP_LIMIT_S + " s";
            } catch (java.util.concurrent.ExecutionException e) {
                Throwable t = e.getCause();
                result = "fail\t" + (t.getClass().getSimpleName() + ": " + t.getMessage()).replaceAll("[\\r\\n\\t]+", " ");
            }
            System.out.println("RESULT\t" + name + "\t" + result);
            System.out.flush();
        }
        System.exit(0);
    }
}
