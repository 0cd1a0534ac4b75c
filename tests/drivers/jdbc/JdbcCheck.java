// The PostgreSQL JDBC driver (pgjdbc) through shardgate.
// Usage: java -cp postgresql.jar JdbcCheck.java pooled|sharded URL
//
// pgjdbc runs a PreparedStatement as the unnamed statement its first four times and
// then prepares it on the server (named S_n); with a fetch size outside autocommit it
// reads a result through a portal, a batch of rows per Execute.
// Prints "ok" and exits 0 when every check holds; a failed check throws.

import java.net.URI;
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;

public class JdbcCheck {
    static void check(boolean cond, String what) {
        if (!cond) throw new AssertionError("check failed: " + what);
    }

    /** postgres://user:password@host:port/db, the form every other check takes. */
    static Connection connect(String url) throws Exception {
        URI u = new URI(url);
        String[] login = u.getUserInfo().split(":", 2);
        return DriverManager.getConnection(
            "jdbc:postgresql://" + u.getHost() + ":" + u.getPort() + u.getPath(), login[0], login[1]);
    }

    static void pooledClient(String url, int i) throws Exception {
        try (Connection c = connect(url)) {
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int + 1")) {
                for (int k = 0; k < 100; k++) {
                    ps.setInt(1, k);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next() && rs.getInt(1) == k + 1, "prepared statement, run " + k);
                    }
                }
            }
            try (Statement s = c.createStatement()) {
                s.execute("SET application_name = 'jdbc" + i + "'");
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT current_setting(?)")) {
                for (int k = 0; k < 10; k++) {
                    ps.setString(1, "application_name");
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next() && rs.getString(1).equals("jdbc" + i), "session setting");
                    }
                }
            }
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("SELECT g FROM generate_series(1, ?) g")) {
                ps.setFetchSize(100);
                ps.setInt(1, 1000);
                int n = 0, last = 0;
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) { n++; last = rs.getInt(1); }
                }
                check(n == 1000 && last == 1000, "rows through a portal: " + n);
            }
            c.commit();
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::bigint * 2")) {
                for (int k = 0; k < 20; k++) { ps.setLong(1, k); ps.addBatch(); }
                ps.executeBatch();
            }
            c.commit();
            try (Statement s = c.createStatement()) {
                s.executeQuery("SELECT 1 / 0");
                check(false, "division by zero did not fail");
            } catch (SQLException e) {
                check("22012".equals(e.getSQLState()), "SQLSTATE " + e.getSQLState());
                c.rollback();
            }
        }
    }

    static void pooled(String url) throws Exception {
        ExecutorService pool = Executors.newFixedThreadPool(20);
        List<Future<Object>> clients = new ArrayList<>();
        for (int t = 0; t < 20; t++) {
            final int i = t;
            clients.add(pool.submit(() -> { pooledClient(url, i); return null; }));
        }
        try {
            for (Future<Object> f : clients) f.get();
        } finally {
            pool.shutdown();
        }
    }

    static void sharded(String url) throws Exception {
        try (Connection c = connect(url)) {
            try (Statement s = c.createStatement()) {
                s.executeUpdate("DELETE FROM posts");
                s.executeUpdate("DELETE FROM users");
            }
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO users (id, name) VALUES (?, ?)")) {
                for (long i = 1; i <= 100; i++) { ps.setLong(1, i); ps.setString(2, "u" + i); ps.addBatch(); }
                ps.executeBatch();
            }
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO posts (id, user_id, body) VALUES (?, ?, ?)")) {
                for (long k = 0; k < 300; k++) { ps.setLong(1, k); ps.setLong(2, k % 100 + 1); ps.setString(3, "p" + k); ps.addBatch(); }
                ps.executeBatch();
            }
            c.commit();
            try (PreparedStatement ps = c.prepareStatement("SELECT name FROM users WHERE id = ?")) {
                for (long i = 1; i <= 100; i++) {
                    ps.setLong(1, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        check(rs.next() && rs.getString(1).equals("u" + i), "user " + i);
                    }
                }
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT id FROM users ORDER BY id")) {
                ps.setFetchSize(10);
                int n = 0;
                long previous = 0;
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) { check(rs.getLong(1) == previous + 1, "order"); previous = rs.getLong(1); n++; }
                }
                check(n == 100, "rows across shards through a portal: " + n);
            }
            c.commit();
        }
    }

    public static void main(String[] args) throws Exception {
        if (args[0].equals("pooled")) pooled(args[1]); else sharded(args[1]);
        System.out.println("ok");
    }
}
