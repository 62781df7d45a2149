package main

// database_test.go: every database failure gets the answer it deserves (503
// for the weather, a clear exit at start), and the service recovers by itself.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// A database that hangs (connections open, nothing answered) gets every
// request its 503 within 5 s, the settling of a lost commit included: a
// client that waits 5 s sees it. /readyz says which dependency is down and
// not its error; a request whose client left is counted as 499.
func TestHungDatabaseAnswersWithin5s(t *testing.T) {
	b := newBroker(t, false)
	schema := createSchema(t)
	proxy, dbURL := newDBProxy(t, schema)
	s := startService(t, serviceEnv(dbURL, b))
	user := newUser()
	// Connections used within the last second are handed out without a
	// ping: the POSTs below then send their commit into the hang, and their
	// outcome must be settled, within the same 5 s. A writer can also fail
	// before its commit (handed a connection idle for longer, which it
	// pings; or none free, the relay's and the consumer's held by the
	// hang): should every writer, no commit was sent, and the round is
	// tried again (at most three).
	client := &http.Client{Timeout: 5 * time.Second}
	var unknown atomic.Int64 // 503s that say the outcome is unknown
	for round := 1; ; round++ {
		var warm sync.WaitGroup
		for range 8 {
			warm.Go(func() { s.createOrder(t, user, 1) })
		}
		warm.Wait()

		proxy.hang(true)
		var wg sync.WaitGroup
		for i := range 8 {
			wg.Go(func() {
				req, _ := http.NewRequest("POST", s.url+"/orders", strings.NewReader(`{"amount": 5}`))
				req.Header.Set("X-User-Id", user)
				start := time.Now()
				resp, err := client.Do(req)
				if err != nil {
					t.Errorf("POST %d with the database hung: %v after %s", i, err, time.Since(start).Round(time.Millisecond))
					return
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
					t.Errorf("POST %d with the database hung: %d, Retry-After %q", i, resp.StatusCode, resp.Header.Get("Retry-After"))
				}
				if strings.Contains(string(body), "did not confirm") {
					unknown.Add(1)
				}
			})
		}
		if round == 1 {
			// A client that gives up first.
			wg.Go(func() {
				req, _ := http.NewRequest("GET", s.url+"/orders", nil)
				req.Header.Set("X-User-Id", user)
				if _, err := (&http.Client{Timeout: 300 * time.Millisecond}).Do(req); err == nil {
					t.Error("GET /orders answered with the database hung, within 300ms")
				}
			})
		}
		wg.Wait()
		if metric(t, s.url, "order_commits_unanswered_total") > 0 {
			break
		}
		if round == 3 {
			t.Fatal("no commit went unanswered in 3 rounds: the settle was not met")
		}
		t.Logf("round %d: no writer's commit reached the hang (each failed before it); once more", round)
		proxy.hang(false)
		waitFor(t, 20*time.Second, "POST /orders 201 after the database answered again", func() bool {
			return do(t, "POST", s.url+"/orders", `{"amount": 6}`, "X-User-Id", user).status == http.StatusCreated
		})
	}
	r := do(t, "GET", s.url+"/readyz", "")
	if r.status != http.StatusServiceUnavailable || string(r.body) != `{"database":"unavailable","kafka":"ok"}`+"\n" {
		t.Errorf("/readyz with the database hung: %d %s", r.status, r.body)
	}
	waitFor(t, 5*time.Second, "the abandoned request counted as 499", func() bool {
		return strings.Contains(string(do(t, "GET", s.url+"/metrics", "").body), `http_requests_total{route="GET /orders",code="499"} 1`)
	})

	proxy.hang(false)
	waitFor(t, 20*time.Second, "POST /orders 201 after the database answered again", func() bool {
		return do(t, "POST", s.url+"/orders", `{"amount": 6}`, "X-User-Id", user).status == http.StatusCreated
	})
	// A commit held by the hang reaches the server once it answers again;
	// only an answer that said the outcome was unknown may have one.
	if n := count(t, newSchemaURL(schema), `SELECT count(*) FROM orders WHERE amount = 5`); n > int(unknown.Load()) {
		t.Errorf("%d orders stored by requests answered 503, %d of them saying the outcome was unknown", n, unknown.Load())
	}
}

// The errors that are not the server's answer to a statement, each made for
// real: a connection the server refuses (here a database that allows none,
// SQLSTATE 55000), an address nobody listens on, a connection that broke
// mid-query, a connection used after it closed. Each is the database's
// weather: 503, never 500.
func TestConnectionErrorsAreTransient(t *testing.T) {
	ctx := context.Background()
	admin, err := pgx.Connect(ctx, testDBURL)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	closed := "order_service_test_closed_" + randomHex(4)
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+closed+" ALLOW_CONNECTIONS false"); err != nil {
		t.Fatal(err)
	}
	defer admin.Exec(ctx, "DROP DATABASE "+closed) //nolint:errcheck // best effort
	errs := map[string]error{}

	_, err = pgx.Connect(ctx, withParam(testDBURL, "dbname", closed))
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "55000" {
		t.Fatalf("connect to a database that allows no connections: %v, want SQLSTATE 55000", err)
	}
	errs["database not accepting connections (55000)"] = err

	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	_, errs["nobody listening"] = pgx.Connect(ctx, "postgres://u@"+addr+"/db?connect_timeout=2")

	victim, err := pgx.Connect(ctx, testDBURL)
	if err != nil {
		t.Fatal(err)
	}
	pid := victim.PgConn().PID()
	var ender sync.WaitGroup
	ender.Go(func() {
		time.Sleep(200 * time.Millisecond)
		admin.Exec(ctx, `SELECT pg_terminate_backend($1)`, pid) //nolint:errcheck // the query below says
	})
	_, errs["connection ended mid-query"] = victim.Exec(ctx, `SELECT pg_sleep(5)`)
	ender.Wait()
	_, errs["connection used after it closed"] = victim.Exec(ctx, `SELECT 1`)

	for what, err := range errs {
		if err == nil {
			t.Errorf("%s: no error", what)
			continue
		}
		if wrapped := fmt.Errorf("context: %w", err); !dbTransient(wrapped) || dbPermanent(wrapped) {
			t.Errorf("%s (%v): transient %v, permanent %v; want transient", what, err, dbTransient(wrapped), dbPermanent(wrapped))
		}
	}
}

// Records that name the same repeat are written once per repeatInterval, the
// next one written saying how many were left out; others pass untouched.
func TestRepeatedFailuresAreLoggedOncePerInterval(t *testing.T) {
	var out bytes.Buffer
	log := slog.New(newQuietHandler(slog.NewTextHandler(&out, nil)))
	t0 := time.Now()
	write := func(at time.Duration, msg string, args ...any) {
		r := slog.NewRecord(t0.Add(at), slog.LevelWarn, msg, 0)
		r.Add(args...)
		if err := log.Handler().Handle(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 100 { // 100 failures over 9.9 s
		write(time.Duration(i)*99*time.Millisecond, "database unavailable", repeatsKey, "db", "err", "down")
	}
	write(5*time.Second, "payment result sent to DLQ", "offset", 7) // not a repeat: always written
	write(11*time.Second, "database unavailable", repeatsKey, "db", "err", "down")
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 || !strings.Contains(lines[0], "database unavailable") || strings.Contains(lines[0], repeatsKey) ||
		!strings.Contains(lines[1], "sent to DLQ") || !strings.Contains(lines[2], "repeated=99 since=11s") {
		t.Errorf("want the first failure, the DLQ line, and one line for the 99 left out; got:\n%s", out.String())
	}
}

// Each SQLSTATE the service may meet, raised by the real server, is classified
// as the README says.
func TestDatabaseErrorClassification(t *testing.T) {
	conn, err := pgx.Connect(context.Background(), testDBURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	for _, c := range []struct {
		code                 string
		transient, permanent bool
	}{
		{"40001", true, false},  // serialization_failure
		{"40P01", true, false},  // deadlock_detected
		{"55P03", true, false},  // lock_not_available
		{"55006", true, false},  // object_in_use
		{"25006", true, false},  // read_only_sql_transaction
		{"57P01", true, false},  // admin_shutdown
		{"57P03", true, false},  // cannot_connect_now
		{"53300", true, false},  // too_many_connections
		{"08006", true, false},  // connection_failure
		{"58030", true, false},  // io_error
		{"22021", false, true},  // character_not_in_repertoire (a NUL)
		{"22008", false, true},  // datetime_field_overflow
		{"22001", false, true},  // string_data_right_truncation
		{"23505", false, true},  // unique_violation
		{"23514", false, true},  // check_violation
		{"42P01", false, false}, // undefined_table: a bug
		{"42601", false, false}, // syntax_error: a bug
	} {
		_, err := conn.Exec(context.Background(), fmt.Sprintf(`DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '%s'; END $$`, c.code))
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != c.code {
			t.Fatalf("raise %s: %v", c.code, err)
		}
		wrapped := fmt.Errorf("context: %w", err)
		if dbTransient(wrapped) != c.transient || dbPermanent(wrapped) != c.permanent {
			t.Errorf("%s: transient %v permanent %v, want %v %v", c.code, dbTransient(wrapped), dbPermanent(wrapped), c.transient, c.permanent)
		}
	}
}

// A request that waits on a lock past lock_timeout (55P03) is told to retry.
func TestLockTimeoutAnswers503(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	env := serviceEnv(dbURL, b)
	env["DATABASE_URL"] = withParam(dbURL, "lock_timeout", "200ms") // a run-time parameter
	s := startService(t, env)
	user := newUser()
	// The test holds the (user, key) row uncommitted: the service's insert
	// with the same key must wait for it, and gives up after lock_timeout.
	tx, err := schemaPool(t, dbURL).Begin(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.Background())
	if _, err := tx.Exec(context.Background(), `INSERT INTO orders (id, user_id, amount, idempotency_key, request_hash)
		VALUES ($1, $2, 1, 'held', '\x00')`, newUUID(), user); err != nil {
		t.Fatal(err)
	}
	r := do(t, "POST", s.url+"/orders", `{"amount": 1}`, "X-User-Id", user, "Idempotency-Key", "held")
	if r.status != http.StatusServiceUnavailable || r.header.Get("Retry-After") == "" || r.header.Get("Content-Type") != "application/problem+json" {
		t.Errorf("lock timeout: %d %v %s, want 503 problem+json with Retry-After", r.status, r.header, r.body)
	}
}

// A failover, as the service sees it: its connections drop, and the server it
// reconnects to takes no writes (SQLSTATE 25006). Writes answer 503 with
// Retry-After, reads go on, /readyz says 503; when the database takes writes
// again the service recovers with no restart.
func TestReadOnlyDatabaseAnswers503AndRecovers(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	app := "svc-" + randomHex(4)
	env := serviceEnv(withParam(dbURL, "application_name", app), b)
	s := startService(t, env)
	user := newUser()
	first := s.createOrder(t, user, 1)
	readPayOrders(t, b, []string{first.ID}, 10*time.Second)

	dbName := testDB.Config().ConnConfig.Database
	setReadOnly := func(on bool) {
		t.Helper()
		q := "ALTER DATABASE " + dbName + " RESET default_transaction_read_only"
		if on {
			q = "ALTER DATABASE " + dbName + " SET default_transaction_read_only = on"
		}
		if _, err := testDB.Exec(context.Background(), q); err != nil {
			t.Fatal(err)
		}
	}
	// The demotion: the database takes no writes, and every connection of
	// the service drops.
	demote := func() {
		t.Helper()
		setReadOnly(true)
		if _, err := testDB.Exec(context.Background(), `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
			WHERE datname = current_database() AND application_name IN ($1, $2)`, app, listenApplicationName); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { setReadOnly(false) })
	demote()
	for i := range 10 {
		r := do(t, "POST", s.url+"/orders", `{"amount": 7}`, "X-User-Id", user)
		if r.status != http.StatusServiceUnavailable || r.header.Get("Retry-After") == "" {
			t.Errorf("POST %d on a read-only database: %d %s, want 503 with Retry-After", i, r.status, r.body)
		}
	}
	if got := s.getOrder(t, user, first.ID); got.ID != first.ID {
		t.Errorf("GET on a read-only database: %+v", got)
	}
	if r := do(t, "GET", s.url+"/orders", "", "X-User-Id", user); r.status != http.StatusOK {
		t.Errorf("list on a read-only database: %d %s", r.status, r.body)
	}

	// Writable again. The connections the service opened meanwhile are
	// read-only sessions: it must close them itself (no /readyz has been
	// asked yet, which would close them too).
	setReadOnly(false)
	var next Order
	waitFor(t, 10*time.Second, "POST 201 once the database takes writes", func() bool {
		r := do(t, "POST", s.url+"/orders", `{"amount": 8}`, "X-User-Id", user)
		if r.status == http.StatusCreated {
			next = r.order(t)
		}
		return r.status == http.StatusCreated
	})
	readPayOrders(t, b, []string{next.ID}, 10*time.Second)
	if n := count(t, dbURL, `SELECT count(*) FROM orders WHERE amount = 7`); n != 0 {
		t.Errorf("%d orders stored by requests answered 503", n)
	}

	// A load balancer asking /readyz is told, and told when it is over.
	demote()
	waitFor(t, 10*time.Second, "/readyz 503 read-only", func() bool {
		r := do(t, "GET", s.url+"/readyz", "")
		return r.status == http.StatusServiceUnavailable && strings.Contains(string(r.body), `"database":"unavailable"`) &&
			strings.Contains(s.logs.String(), "the database is read-only")
	})
	setReadOnly(false)
	waitFor(t, 10*time.Second, "/readyz 200 again", func() bool { return do(t, "GET", s.url+"/readyz", "").status == http.StatusOK })
}

// A failover, after start-up, to a server older than PostgreSQL 14 (say an
// old standby): the service cannot settle a lost commit there, so it takes no
// orders, and answers 503 (the database unavailable), not 500 (a bug). Once
// the pool reaches a new enough server again, orders are taken.
func TestServerOlderThan14AfterStartAnswers503(t *testing.T) {
	b := newBroker(t, false)
	p, dbURL := newCommitProxy(t, createSchema(t))
	s := startService(t, serviceEnv(dbURL, b))
	user := newUser()
	s.createOrder(t, user, 1)

	old := "13.16"
	p.version.Store(&old)
	p.set(false) // every connection drops; the new ones announce 13.16
	refused := func() bool { return strings.Contains(s.logs.String(), "PostgreSQL 14 or newer is needed") }
	deadline := time.Now().Add(10 * time.Second)
	// Until the service has met the old server, and three requests after.
	for after := 0; after < 3; {
		if time.Now().After(deadline) {
			t.Fatalf("no connection to the old server refused within 10s:\n%s", s.logs)
		}
		if refused() {
			after++
		}
		r := do(t, "POST", s.url+"/orders", `{"amount": 5}`, "X-User-Id", user)
		if r.status != http.StatusServiceUnavailable || r.header.Get("Content-Type") != "application/problem+json" {
			t.Fatalf("POST with the server at 13.16: %d %s, want 503 problem+json", r.status, r.body)
		}
	}
	if r := do(t, "GET", s.url+"/readyz", ""); r.status != http.StatusServiceUnavailable {
		t.Errorf("/readyz with the server at 13.16: %d %s, want 503", r.status, r.body)
	}

	p.version.Store(nil)
	p.set(false)
	waitFor(t, 10*time.Second, "an order taken on a new enough server", func() bool {
		return do(t, "POST", s.url+"/orders", `{"amount": 5}`, "X-User-Id", user).status == http.StatusCreated
	})
}

// With the database down, requests get 503 problem+json within 5 s and
// goroutines do not pile up; the same process recovers by itself, relay and
// consumer included, and a storm of identical failures is logged once per
// interval with a count.
func TestDatabaseOutageAnswers503AndRecovers(t *testing.T) {
	b := newBroker(t, false)
	schema := createSchema(t)
	proxy, dbURL := newDBProxy(t, schema)
	env := serviceEnv(dbURL, b)
	// No fallback poll: after the outage only the re-established LISTEN
	// connection can wake the relay.
	env["RELAY_POLL_INTERVAL"] = "1h"
	s := startService(t, env)
	user := newUser()
	first := s.createOrder(t, user, 1)
	readPayOrders(t, b, []string{first.ID}, 10*time.Second)
	baseline := runtime.NumGoroutine()

	proxy.set(true)
	// A payment result arriving during the outage must wait, not be lost.
	produce(t, b, b.topic(topicPaymentResults), first.ID, `{"order_id": "`+first.ID+`", "status": "PAID"}`)
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Go(func() {
			start := time.Now()
			var r response
			switch i % 3 {
			case 0:
				r = do(t, "POST", s.url+"/orders", `{"amount": 5}`, "X-User-Id", user)
			case 1:
				r = do(t, "GET", s.url+"/orders", "", "X-User-Id", user)
			default:
				r = do(t, "GET", s.url+"/orders/"+first.ID, "", "X-User-Id", user)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("request %d took %s with the database down", i, d)
			}
			if r.status != http.StatusServiceUnavailable || r.header.Get("Content-Type") != "application/problem+json" {
				t.Errorf("request %d: %d %s, want 503 problem+json", i, r.status, r.body)
			}
		})
	}
	wg.Wait()
	if r := do(t, "GET", s.url+"/readyz", ""); r.status != http.StatusServiceUnavailable {
		t.Errorf("/readyz with the database down: %d %s", r.status, r.body)
	}
	// A storm of identical failures is logged once per interval, not once
	// per request.
	if n := strings.Count(s.logs.String(), `msg="database unavailable"`); n == 0 || n > 2 {
		t.Errorf(`%d lines "database unavailable" for 40 requests answered 503 within seconds, want 1 or 2`, n)
	}

	proxy.set(false)
	var next Order
	waitFor(t, 20*time.Second, "POST /orders 201 after the database returned", func() bool {
		r := do(t, "POST", s.url+"/orders", `{"amount": 6}`, "X-User-Id", user)
		if r.status == http.StatusCreated {
			next = r.order(t)
		}
		return r.status == http.StatusCreated
	})
	readPayOrders(t, b, []string{next.ID}, 20*time.Second) // the relay resumed
	waitFor(t, 20*time.Second, "the result sent during the outage applied", func() bool {
		return s.getOrder(t, user, first.ID).Status == "PAID"
	})
	if n := count(t, newSchemaURL(schema), `SELECT count(*) FROM orders WHERE amount = 5`); n != 0 {
		t.Errorf("%d orders written by requests that were answered 503", n)
	}
	waitFor(t, 15*time.Second, "goroutines back to the baseline", func() bool {
		return runtime.NumGoroutine() <= baseline+20
	})
}

// A database unreachable at start is retried for STARTUP_TIMEOUT, then the
// process exits 1 with one line naming the address; a missing database, a
// refused role or a server older than PostgreSQL 14 exits at once.
func TestStartupExitsWithOneLineWhenDatabaseUnreachable(t *testing.T) {
	b := newBroker(t, false)
	addr := "127.0.0.1:" + freePort() // nobody listens here
	env := childEnvFor("postgres://root@"+addr+"/orders?connect_timeout=1", b)
	env["STARTUP_TIMEOUT"] = "2s"
	line, took := startupFailure(t, env)
	if !strings.Contains(line, addr) || !strings.Contains(line, "unreachable") {
		t.Errorf("exit line %q does not name %s", line, addr)
	}
	if took < 2*time.Second || took > 15*time.Second {
		t.Errorf("gave up after %s; want the 2s STARTUP_TIMEOUT plus start-up", took)
	}
}

// A database that answers "no such database" will not change its mind:
// start-up stops at once instead of waiting out STARTUP_TIMEOUT.
func TestStartupStopsAtOnceWhenDatabaseRefuses(t *testing.T) {
	b := newBroker(t, false)
	env := childEnvFor(withParam(testDBURL, "dbname", "order_service_no_such_db"), b)
	env["STARTUP_TIMEOUT"] = "60s"
	line, took := startupFailure(t, env)
	if !strings.Contains(line, "order_service_no_such_db") || !strings.Contains(line, "refused") {
		t.Errorf("exit line %q does not name the database", line)
	}
	if took > 15*time.Second {
		t.Errorf("gave up after %s; the 60s STARTUP_TIMEOUT was waited out", took)
	}
}

// Settling a commit whose answer was lost needs PostgreSQL 14 (endBackend):
// on an older server, start-up stops at once and says why, rather than
// answer 503 "outcome unknown" on the day a commit's answer is lost.
func TestStartupStopsAtOnceWhenPostgreSQLIsOlderThan14(t *testing.T) {
	b := newBroker(t, false)
	p, dbURL := newCommitProxy(t, createSchema(t))
	old := "13.16 (Debian 13.16-1.pgdg120+1)"
	p.version.Store(&old)
	env := childEnvFor(dbURL, b)
	env["STARTUP_TIMEOUT"] = "60s"
	line, took := startupFailure(t, env)
	t.Logf("exit line: %s", line)
	if !strings.Contains(line, "PostgreSQL 14 or newer") || !strings.Contains(line, "PostgreSQL 13.16") {
		t.Errorf("exit line %q does not say that 14 is needed and 13.16 found", line)
	}
	if took > 15*time.Second {
		t.Errorf("gave up after %s; the 60s STARTUP_TIMEOUT was waited out", took)
	}
}

// startupFailure runs the service with env, which it cannot start with, and
// returns the one line it exits with (status 1) and how long it took.
func startupFailure(t *testing.T, env map[string]string) (string, time.Duration) {
	t.Helper()
	start := time.Now()
	c := startChild(t, env)
	select {
	case <-c.done:
	case <-time.After(20 * time.Second):
		t.Fatal("still running 20s after a start that cannot succeed")
	}
	var exit *exec.ExitError
	if !errors.As(c.err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("exit: %v, want status 1", c.err)
	}
	lines := strings.Split(strings.TrimSpace(c.stderr.String()), "\n")
	if len(lines) != 1 {
		t.Errorf("stderr %q: want one line", c.stderr.String())
	}
	return lines[0], time.Since(start)
}
