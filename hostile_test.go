package main

// The world outside the service's own model: a Payment Service that sends
// anything, a database that fails over or loses a COMMIT's answer, a broker
// or a consumer group that never answers during shutdown. Every outside
// input is classified: the sender's fault goes to the DLQ (or 4xx), a
// transient fault is retried (or 503), and nothing stops the consumer.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// A hostile Payment Service, all on one partition, ahead of a valid result:
// every record is applied or dead-lettered, and the valid one behind them all
// is applied.
func TestHostilePaymentResultsNeverStopTheConsumer(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	s := startService(t, serviceEnv(dbURL, b))
	user := newUser()
	var o [6]Order
	for i := range o {
		o[i] = s.createOrder(t, user, int64(10+i))
	}
	key := o[0].ID // one key: one partition, in this order
	result := func(v string) *kgo.Record {
		return &kgo.Record{Topic: b.topic(topicPaymentResults), Key: []byte(key), Value: []byte(v)}
	}
	hugeReason := strings.Repeat("ж", 300_000) // 600 KB
	recs := []*kgo.Record{
		// Values that only need cleaning are applied (see decodePaymentResult).
		result(`{"order_id": "` + o[0].ID + `", "status": "FAILED", "reason": "card\u0000declined"}`),
		result(`{"order_id": "` + o[1].ID + "\", \"status\": \"FAILED\", \"reason\": \"bad \xff\xfe bytes \\u0001\\u001b ctl\"}"),
		result(`{"order_id": "` + o[3].ID + `", "status": "FAILED", "reason": "` + hugeReason + `"}`),
		// Poison.
		result(`{"order_id": "` + o[2].ID + `", "status": "FAILED", "status": "PAID"}`),  // which one did the sender mean?
		result(`{"order_id": "` + o[2].ID + `", "STATUS": "PAID"}`),                      // encoding/json would read it as status
		result(`{"order_id": "` + strings.Repeat("x", 600_000) + `", "status": "PAID"}`), // its error would quote 600 KB
		result(strings.Repeat("[", 20_000) + strings.Repeat("]", 20_000)),                // nested 20 000 deep
		result(`{"order_id": 42, "status": "PAID"}`),                                     // a number where a string belongs
		result(`{"order_id": "` + o[4].ID + `", "status": ["PAID"]}`),
		result(`{"order_id": "` + o[4].ID + `", "status": "REFUNDED", "junk": "` + strings.Repeat("y", 1_040_000) + `"}`), // its DLQ copy cannot fit
		// The valid result behind them all.
		result(`{"order_id": "` + o[5].ID + `", "status": "PAID"}`),
	}
	const firstPoison, poison = 3, 7
	produceRecords(t, b, recs...)

	waitFor(t, 20*time.Second, "the valid result behind the poison applied", func() bool {
		return s.getOrder(t, user, o[5].ID).Status == "PAID"
	})
	waitCommitted(t, b)
	got := make([]Order, len(o))
	for i := range o {
		got[i] = s.getOrder(t, user, o[i].ID)
	}
	reason := func(o Order) string {
		if o.FailureReason == nil {
			return "<nil>"
		}
		return *o.FailureReason
	}
	if got[0].Status != "FAILED" || reason(got[0]) != "card\uFFFDdeclined" {
		t.Errorf("NUL in reason: %s %q, want FAILED with the NUL replaced by U+FFFD", got[0].Status, reason(got[0]))
	}
	if got[1].Status != "FAILED" || reason(got[1]) != "bad \uFFFD\uFFFD bytes \x01\x1b ctl" {
		t.Errorf("invalid UTF-8 and control characters: %s %q", got[1].Status, reason(got[1]))
	}
	if got[2].Status != "PENDING" {
		t.Errorf("duplicate key, wrongly cased key: %s, want PENDING (both dead-lettered)", got[2].Status)
	}
	if r := reason(got[3]); got[3].Status != "FAILED" || utf8.RuneCountInString(r) != maxReason || r != hugeReason[:2*maxReason] {
		t.Errorf("600 KB reason: %s, %d characters stored, want FAILED and the first %d", got[3].Status, utf8.RuneCountInString(r), maxReason)
	}
	if got[4].Status != "PENDING" {
		t.Errorf("order behind two poison records: %s, want PENDING", got[4].Status)
	}

	dlq := readTopic(t, b, b.topic(topicPaymentDLQ), 20*time.Second, func(r []*kgo.Record) bool { return len(r) >= poison })
	if len(dlq) != poison {
		t.Fatalf("DLQ has %d records, want %d", len(dlq), poison)
	}
	for i, r := range dlq {
		h := headerMap(r)
		orig := recs[firstPoison+i]
		if h["original-offset"] != fmt.Sprint(orig.Offset) || h["error"] == "" || len(h["error"]) > maxErrorHeader+len("…") {
			t.Errorf("DLQ record %d: original-offset %s (want %d), error header of %d bytes", i, h["original-offset"], orig.Offset, len(h["error"]))
		}
		if i < poison-1 && (!bytes.Equal(r.Value, orig.Value) || h["truncated"] != "") {
			t.Errorf("DLQ record %d: value of %d bytes (original %d), truncated %q; want the original", i, len(r.Value), len(orig.Value), h["truncated"])
		}
	}
	last := dlq[poison-1]
	if h := headerMap(last); h["truncated"] == "" || !bytes.Equal(last.Value, recs[firstPoison+poison-1].Value[:truncatedBytes]) {
		t.Errorf("oversized DLQ copy: %d bytes, headers %v; want its first %d bytes and a truncated header", len(last.Value), h, truncatedBytes)
	}
	if n := metric(t, s.url, `payment_results_dlq_total{reason="invalid"}`) + metric(t, s.url, `payment_results_dlq_total{reason="unknown_order"}`) +
		metric(t, s.url, `payment_results_dlq_total{reason="refused"}`); n != poison {
		t.Errorf("payment_results_dlq_total %v, want %d", n, poison)
	}
}

// A value the database itself refuses (here a CHECK constraint the test adds;
// SQLSTATE 23514) is one record's fault: that record alone goes to the DLQ and
// the rest of its poll is applied.
func TestRecordTheDatabaseRefusesIsDeadLetteredAlone(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	env := serviceEnv(dbURL, b)
	s := startService(t, env)
	user := newUser()
	var ids []string
	for range 6 {
		ids = append(ids, s.createOrder(t, user, 5).ID)
	}
	if err := s.stop(t); err != nil {
		t.Fatal(err)
	}
	if _, err := schemaPool(t, dbURL).Exec(context.Background(),
		`ALTER TABLE orders ADD CONSTRAINT test_refuses CHECK (failure_reason IS DISTINCT FROM 'refused')`); err != nil {
		t.Fatal(err)
	}
	// Produced while no consumer runs, on one partition: the restarted
	// service reads them in one poll, and applies them in one transaction.
	var recs []*kgo.Record
	refused := map[int]bool{1: true, 4: true}
	for i, id := range ids {
		v := `{"order_id": "` + id + `", "status": "FAILED", "reason": "ok"}`
		if refused[i] {
			v = `{"order_id": "` + id + `", "status": "FAILED", "reason": "refused"}`
		}
		recs = append(recs, &kgo.Record{Topic: b.topic(topicPaymentResults), Key: []byte(ids[0]), Value: []byte(v)})
	}
	produceRecords(t, b, recs...)
	s2 := startService(t, env)
	waitCommitted(t, b)
	for i, id := range ids {
		want := "FAILED"
		if refused[i] {
			want = "PENDING"
		}
		if got := s2.getOrder(t, user, id).Status; got != want {
			t.Errorf("order %d: %s, want %s", i, got, want)
		}
	}
	dlq := readTopicNow(t, b, b.topic(topicPaymentDLQ))
	if len(dlq) != 2 {
		t.Fatalf("DLQ has %d records, want the 2 refused", len(dlq))
	}
	for i, r := range dlq {
		h := headerMap(r)
		if want := []string{"1", "4"}[i]; h["original-offset"] != want || !strings.Contains(h["error"], "23514") {
			t.Errorf("DLQ record %d: offset %s (want %s), error %q", i, h["original-offset"], want, h["error"])
		}
	}
	if n := metric(t, s2.url, `payment_results_dlq_total{reason="refused"}`); n != 2 {
		t.Errorf(`payment_results_dlq_total{reason="refused"} %v, want 2`, n)
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

// poolerPID is the process id commitProxy announces for every connection.
const poolerPID = 2_000_000_000

// commitProxy forwards to PostgreSQL as a pooler in session mode would, and
// acts on one order commit: the COMMIT bound, in an extended-protocol
// pipeline, on the connection that sent the marker it was armed with (an
// Idempotency-Key, among a statement's parameters). Other commits pass
// untouched, the relay's among them: it commits a claim every poll, on
// connections of the same pool. Armed with a delay, it holds back the
// server's answer for that long, as a slow network would; armed to cut, it
// forwards the whole pipeline and then drops the connection, and every
// cancel request after, as a network that fails just then would. As poolers
// do, it announces made-up process ids (poolerPID), so that the service must
// learn the real one from the server.
type commitProxy struct {
	*tcpProxy
	armed       atomic.Pointer[commitAct]
	cancelsLost atomic.Bool // since the cut
	// version, when set, is the server_version announced to clients in
	// place of the server's, as an older server would announce its own.
	version atomic.Pointer[string]
}

// commitAct is what commitProxy does to the COMMIT of the connection that
// sends marker.
type commitAct struct {
	marker []byte
	delay  time.Duration
	cut    bool
	fatal  fatalAt
}

// fatalAt is where the proxy ends a connection as a server process told to
// terminate (FATAL 57P01) does: not at all, just after COMMIT's answer, or in
// its place.
type fatalAt int

const (
	noFatal fatalAt = iota
	fatalAfterCommit
	fatalInsteadOfCommit
)

// arm makes the proxy act on the next COMMIT of the connection that sends
// marker: hold its answer back for delay, or cut the connection after it.
func (p *commitProxy) arm(marker string, delay time.Duration, cut bool) {
	p.armed.Store(&commitAct{marker: []byte(marker), delay: delay, cut: cut})
}

// armFatal makes the proxy end the connection that sends marker with FATAL
// 57P01 at the next COMMIT: after its answer, or instead of it (the server
// commits either way), and close the server's side.
func (p *commitProxy) armFatal(marker string, at fatalAt) {
	p.armed.Store(&commitAct{marker: []byte(marker), fatal: at})
}

// terminated is the ErrorResponse of a server process ended by
// pg_terminate_backend or a fast shutdown.
var terminated = func() []byte {
	body := []byte("SFATAL\x00VFATAL\x00C57P01\x00Mterminating connection due to administrator command\x00\x00")
	msg := append([]byte{'E', 0, 0, 0, 0}, body...)
	binary.BigEndian.PutUint32(msg[1:], uint32(len(body)+4))
	return msg
}()

func newCommitProxy(t testing.TB, schema string) (*commitProxy, string) {
	p, url := newDBProxy(t, schema)
	cp := &commitProxy{tcpProxy: p}
	p.mu.Lock()
	p.pipeFn = cp.pipe
	p.mu.Unlock()
	return cp, url
}

// pipe reads the client's messages (after the untyped startup message, each
// is a type byte and a length), remembers which prepared statement is COMMIT
// from its Parse, and knows the commit by its Bind.
func (p *commitProxy) pipe(c net.Conn) {
	up, ok := p.connect(c)
	if !ok {
		return
	}
	var holdUntil atomic.Int64
	var fatal atomic.Int32 // a fatalAt, for this connection's next COMMIT answer
	go func() {
		defer up.Close()
		var n [4]byte
		if _, err := io.ReadFull(c, n[:]); err != nil {
			return
		}
		startup := make([]byte, binary.BigEndian.Uint32(n[:])-4)
		if _, err := io.ReadFull(c, startup); err != nil {
			return
		}
		// A CancelRequest (code 80877102) comes on a connection of its own,
		// as pgx sends one when it drops a connection; after a cut, the
		// network that lost the pipeline's answer loses these too.
		if len(startup) == 12 && binary.BigEndian.Uint32(startup) == 80877102 && p.cancelsLost.Load() {
			c.Close()
			return
		}
		up.Write(append(n[:], startup...))
		commits := map[string]bool{} // prepared statement names whose SQL is COMMIT
		var marked *commitAct        // the act whose marker this connection sent
		cutAtSync := false
		for {
			var hdr [5]byte
			if _, err := io.ReadFull(c, hdr[:]); err != nil {
				return
			}
			body := make([]byte, binary.BigEndian.Uint32(hdr[1:])-4)
			if _, err := io.ReadFull(c, body); err != nil {
				return
			}
			switch hdr[0] {
			case 'P': // Parse: statement name, query
				if f := bytes.SplitN(body, []byte{0}, 3); len(f) == 3 && strings.EqualFold(string(f[1]), "commit") {
					commits[string(f[0])] = true
				}
			case 'B': // Bind: portal name, statement name, parameters
				if a := p.armed.Load(); a != nil && bytes.Contains(body, a.marker) {
					marked = a
				}
				if f := bytes.SplitN(body, []byte{0}, 3); len(f) == 3 && commits[string(f[1])] &&
					marked != nil && p.armed.CompareAndSwap(marked, nil) {
					if marked.delay > 0 {
						holdUntil.Store(time.Now().Add(marked.delay).UnixNano())
					}
					cutAtSync = marked.cut
					fatal.Store(int32(marked.fatal))
				}
			}
			if _, err := up.Write(append(hdr[:], body...)); err != nil {
				return
			}
			if hdr[0] == 'S' && cutAtSync {
				p.cancelsLost.Store(true)
				c.Close()
				return
			}
		}
	}()
	// Like a pooler, the proxy tells the client a process id of its own
	// (no PostgreSQL process has it): the server's BackendKeyData ('K')
	// arrives before the first ReadyForQuery.
	for {
		var hdr [5]byte
		if _, err := io.ReadFull(up, hdr[:]); err != nil {
			c.Close()
			return
		}
		body := make([]byte, binary.BigEndian.Uint32(hdr[1:])-4)
		if _, err := io.ReadFull(up, body); err != nil {
			c.Close()
			return
		}
		if hdr[0] == 'K' && len(body) >= 4 {
			binary.BigEndian.PutUint32(body, poolerPID)
		}
		if v := p.version.Load(); v != nil && hdr[0] == 'S' && bytes.HasPrefix(body, []byte("server_version\x00")) {
			body = append([]byte("server_version\x00"+*v), 0)
			binary.BigEndian.PutUint32(hdr[1:], uint32(len(body)+4))
		}
		if _, err := c.Write(append(hdr[:], body...)); err != nil {
			return
		}
		if hdr[0] == 'Z' {
			break
		}
	}
	r := &msgReader{r: up}
	for {
		typ, body, err := r.next()
		if err != nil {
			break
		}
		time.Sleep(time.Until(time.Unix(0, holdUntil.Load())))
		if at := fatalAt(fatal.Load()); typ == 'C' && string(body) == "COMMIT\x00" && at != noFatal {
			if at == fatalAfterCommit {
				c.Write(r.raw) //nolint:errcheck // the connection ends below either way
			}
			c.Write(terminated) //nolint:errcheck // as above
			up.Close()
			break
		}
		if _, err := c.Write(r.raw); err != nil {
			break
		}
	}
	c.Close()
}

// The server commits, but its answer arrives after the request's deadline.
// The service ends the server process that held the transaction, finds the
// order, and answers 201, rather than 503 for an order that exists.
func TestCommitWhoseAnswerIsLateIsSettled(t *testing.T) {
	b := newBroker(t, false)
	schema := createSchema(t)
	proxy, dbURL := newCommitProxy(t, schema)
	s := startService(t, serviceEnv(dbURL, b))
	user := newUser()
	readPayOrders(t, b, []string{s.createOrder(t, user, 1).ID}, 10*time.Second)

	key := "late-" + randomHex(4)
	proxy.arm(key, requestDBTimeout+2*time.Second, false)
	start := time.Now()
	r := do(t, "POST", s.url+"/orders", `{"amount": 42}`, "X-User-Id", user, "Idempotency-Key", key)
	took := time.Since(start)
	if got := metric(t, s.url, "order_commits_unanswered_total"); got != 1 {
		t.Fatalf("order_commits_unanswered_total %v: the COMMIT's answer was not delayed past the deadline (took %s)", got, took)
	}
	if r.status != http.StatusCreated {
		t.Fatalf("the order committed but the answer was %d %s (after %s)", r.status, r.body, took)
	}
	o := r.order(t)
	if n := count(t, newSchemaURL(schema), `SELECT count(*) FROM orders WHERE id = $1`, o.ID); n != 1 {
		t.Errorf("%d rows for the order answered 201", n)
	}
	readPayOrders(t, b, []string{o.ID}, 10*time.Second)
	t.Logf("COMMIT answer held back %s: answered 201 after %s", requestDBTimeout+2*time.Second, took.Round(time.Millisecond))
}

// A server process told to terminate while it flushes an order's commit
// (pg_terminate_backend, a fast shutdown, a switchover) finishes the commit,
// answers it, and then sends FATAL 57P01: the order is stored and answered
// 201, with no settling, since the answer said so. When FATAL comes instead
// of COMMIT's answer, nothing says what happened: the commit is settled, and
// the stored order answered 201 too. Never 503 for an order that exists.
func TestCommitAnsweredThenFatalIsACommit(t *testing.T) {
	b := newBroker(t, false)
	schema := createSchema(t)
	proxy, dbURL := newCommitProxy(t, schema)
	s := startService(t, serviceEnv(dbURL, b))
	user := newUser()
	for _, c := range []struct {
		at      fatalAt
		settled float64
	}{{fatalAfterCommit, 0}, {fatalInsteadOfCommit, 1}} {
		before := metric(t, s.url, "order_commits_unanswered_total")
		key := "fatal-" + randomHex(4)
		proxy.armFatal(key, c.at)
		r := do(t, "POST", s.url+"/orders", `{"amount": 42}`, "X-User-Id", user, "Idempotency-Key", key)
		if proxy.armed.Load() != nil {
			t.Fatalf("the proxy never met the order's COMMIT (answer %d %s)", r.status, r.body)
		}
		if r.status != http.StatusCreated {
			t.Fatalf("FATAL %s: the order committed but the answer was %d %s", []string{"", "after COMMIT's answer", "instead of it"}[c.at], r.status, r.body)
		}
		o := r.order(t)
		if n := count(t, newSchemaURL(schema), `SELECT count(*) FROM orders WHERE id = $1`, o.ID); n != 1 {
			t.Errorf("%d rows for the order answered 201", n)
		}
		if got := metric(t, s.url, "order_commits_unanswered_total") - before; got != c.settled {
			t.Errorf("%v commits settled, want %v", got, c.settled)
		}
		readPayOrders(t, b, []string{o.ID}, 10*time.Second)
	}
	// The pool goes on with new connections.
	s.createOrder(t, user, 7)
}

// The connection drops just after the service sent BEGIN, the insert and
// COMMIT in one pipeline, while the server's insert waits on a lock (the
// test holds the same Idempotency-Key uncommitted). The server process would
// run that COMMIT once the lock is free, after the request had been answered.
// So the service ends that process before it answers, and answers 503 (not
// stored, retry): once the lock is free, nothing of the request commits.
func TestCommitCutWhileItsTransactionWaitsIsNeverStored(t *testing.T) {
	b := newBroker(t, false)
	schema := createSchema(t)
	proxy, dbURL := newCommitProxy(t, schema)
	s := startService(t, serviceEnv(dbURL, b))
	direct := schemaPool(t, newSchemaURL(schema))
	ctx := context.Background()
	user, key := newUser(), "held-"+randomHex(4)

	holder, err := direct.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Rollback(ctx)
	var holderPID int32
	if err := holder.QueryRow(ctx, `INSERT INTO orders (id, user_id, amount, idempotency_key, request_hash)
		VALUES ($1, $2, 1, $3, '\x00') RETURNING pg_backend_pid()`, newUUID(), user, key).Scan(&holderPID); err != nil {
		t.Fatal(err)
	}

	proxy.arm(key, 0, true)
	r := do(t, "POST", s.url+"/orders", `{"amount": 7}`, "X-User-Id", user, "Idempotency-Key", key)
	if got := metric(t, s.url, "order_commits_unanswered_total"); got != 1 {
		t.Fatalf("order_commits_unanswered_total %v: the connection was not cut after the COMMIT (answer %d %s)", got, r.status, r.body)
	}
	if r.status != http.StatusServiceUnavailable || r.header.Get("Retry-After") == "" || r.header.Get("Content-Type") != "application/problem+json" {
		t.Errorf("cut commit, not stored: %d %v %s, want 503 problem+json with Retry-After", r.status, r.header, r.body)
	}
	// Answered, so the server process that held the request's COMMIT must
	// be gone: none may still wait on the test's lock.
	if n := count(t, newSchemaURL(schema), `SELECT count(*) FROM pg_stat_activity WHERE $1::int = ANY(pg_blocking_pids(pid))`, holderPID); n != 0 {
		t.Fatalf("%d server processes still wait on the held key after the 503: the request's COMMIT may yet run", n)
	}
	if err := holder.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if n := count(t, newSchemaURL(schema), `SELECT count(*) FROM orders WHERE user_id = $1`, user); n != 0 {
		t.Errorf("%d orders stored for a request answered 503", n)
	}
	// The retry the 503 asks for stores the order, once.
	again := do(t, "POST", s.url+"/orders", `{"amount": 7}`, "X-User-Id", user, "Idempotency-Key", key)
	if again.status != http.StatusCreated {
		t.Fatalf("retry: %d %s", again.status, again.body)
	}
	readPayOrders(t, b, []string{again.order(t).ID}, 10*time.Second)
	if n := count(t, newSchemaURL(schema), `SELECT count(*) FROM orders WHERE user_id = $1`, user); n != 1 {
		t.Errorf("%d orders after the retry, want 1", n)
	}
}

// An order whose COMMIT fails leaves no event, and no event exists without
// its order: the outbox row is written in the order's transaction. The test
// adds a deferred constraint trigger that fails one order at COMMIT.
func TestOrderWhoseCommitFailsLeavesNoEvent(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	s := startService(t, serviceEnv(dbURL, b))
	if _, err := schemaPool(t, dbURL).Exec(context.Background(), `
		CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN RAISE EXCEPTION 'refused at commit by the test'; END $$;
		CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON orders DEFERRABLE INITIALLY DEFERRED
		FOR EACH ROW WHEN (NEW.description = 'fail at commit') EXECUTE FUNCTION fail_at_commit();`); err != nil {
		t.Fatal(err)
	}
	user := newUser()
	r := do(t, "POST", s.url+"/orders", `{"amount": 3, "description": "fail at commit"}`, "X-User-Id", user)
	if r.status < 500 {
		t.Fatalf("POST whose commit fails: %d %s", r.status, r.body)
	}
	ok := s.createOrder(t, user, 4)
	readPayOrders(t, b, []string{ok.ID}, 10*time.Second)
	if n := count(t, dbURL, `SELECT count(*) FROM orders`); n != 1 {
		t.Errorf("%d orders stored, want only the one that committed", n)
	}
	if n := count(t, dbURL, `SELECT count(*) FROM outbox WHERE key NOT IN (SELECT id::text FROM orders)`); n != 0 {
		t.Errorf("%d outbox events without their order", n)
	}
	if n := endOffsets(t, b, b.topic(topicPayOrder)); n != 1 {
		t.Errorf("pay-order holds %d records, want 1", n)
	}
}

// waitClaimed waits until some outbox row is claimed: the relay has leased it
// and waits on the broker.
func waitClaimed(t testing.TB, dbURL string) {
	t.Helper()
	waitFor(t, 10*time.Second, "the relay holding claimed rows", func() bool {
		return count(t, dbURL, `SELECT count(*) FROM outbox WHERE lease_until > now()`) > 0
	})
}

// swallow makes the in-process broker take requests of the given keys (all,
// if none) and never answer them, until the returned func is called.
func swallow(b *broker, keys ...kmsg.Key) func() {
	var on atomic.Bool
	on.Store(true)
	fn := func(kmsg.Request) (kmsg.Response, error, bool) {
		if !on.Load() {
			return nil, nil, false
		}
		b.cluster.KeepControl()
		return nil, nil, true
	}
	if len(keys) == 0 {
		b.cluster.Control(fn)
	}
	for _, k := range keys {
		b.cluster.ControlKey(k.Int16(), fn)
	}
	return func() { on.Store(false) }
}

// SIGTERM ends the process within SHUTDOWN_TIMEOUT whatever the broker and
// the consumer group are doing; what it could not finish is done after a
// restart.
func TestShutdownEndsWithinBudget(t *testing.T) {
	const budget = 3 * time.Second
	sigterm := func(t *testing.T, c *child) time.Duration {
		t.Helper()
		took := c.sigterm(t, budget+10*time.Second)
		if c.err != nil {
			t.Errorf("exit: %v, want status 0", c.err)
		}
		if took > budget+500*time.Millisecond {
			t.Errorf("shutdown took %s; SHUTDOWN_TIMEOUT is %s", took, budget)
		}
		return took
	}
	start := func(t *testing.T) (*broker, string, map[string]string, *child) {
		b := newBroker(t, true)
		dbURL := newSchema(t)
		env := childEnvFor(dbURL, b)
		env["SHUTDOWN_TIMEOUT"] = budget.String()
		env["RELAY_PRODUCE_TIMEOUT"] = "1m"
		c := startChild(t, env)
		c.waitReady(t)
		return b, dbURL, env, c
	}

	t.Run("the broker answers nothing", func(t *testing.T) {
		b, dbURL, env, c := start(t)
		user := newUser()
		first := do(t, "POST", c.url+"/orders", `{"amount": 1}`, "X-User-Id", user).order(t)
		readPayOrders(t, b, []string{first.ID}, 10*time.Second)
		release := swallow(b)
		o := do(t, "POST", c.url+"/orders", `{"amount": 2}`, "X-User-Id", user).order(t)
		waitClaimed(t, dbURL)
		took := sigterm(t, c)
		t.Logf("exit %s after SIGTERM with the relay's produce and the group stalled", took.Round(time.Millisecond))
		if n := count(t, dbURL, `SELECT count(*) FROM outbox WHERE key = $1`, o.ID); n != 1 {
			t.Errorf("the abandoned event is not left unpublished in the outbox")
		}
		release()
		env["HTTP_ADDR"] = "127.0.0.1:" + freePort()
		startChild(t, env).waitReady(t)
		readPayOrders(t, b, []string{o.ID}, 20*time.Second)
	})

	t.Run("the group is mid-rebalance", func(t *testing.T) {
		b, dbURL, _, c := start(t)
		user := newUser()
		o := do(t, "POST", c.url+"/orders", `{"amount": 1}`, "X-User-Id", user).order(t)
		produce(t, b, b.topic(topicPaymentResults), o.ID, `{"order_id": "`+o.ID+`", "status": "PAID"}`)
		waitFor(t, 15*time.Second, "result applied", func() bool {
			return count(t, dbURL, `SELECT count(*) FROM orders WHERE status = 'PAID'`) == 1
		})
		waitCommitted(t, b)
		// A second member joins; the rebalance it starts never completes.
		release := swallow(b, kmsg.SyncGroup)
		other, err := kgo.NewClient(kgo.SeedBrokers(b.addrs...), kgo.ConsumerGroup(b.topic(consumerGroup)),
			kgo.ConsumeTopics(b.topic(topicPaymentResults)))
		if err != nil {
			t.Fatal(err)
		}
		// Its SyncGroup was swallowed, and kgo's Close waits for it for
		// the rebalance timeout (60s; the very hang the service's bounded
		// shutdown guards against): close it in the background, where the
		// broker's own close ends it.
		defer func() { go other.Close() }()
		go other.PollFetches(context.Background())
		waitFor(t, 15*time.Second, "the group stuck mid-rebalance", func() bool {
			return groupState(t, b) == "CompletingRebalance"
		})
		took := sigterm(t, c)
		t.Logf("exit %s after SIGTERM mid-rebalance", took.Round(time.Millisecond))
		release()
		// The group's SyncGroup requests were swallowed, so it waits out
		// its rebalance timeout before anyone can join again: rather than
		// restart, check that what was applied stays committed.
		if at := committedAt(t, b); at != 1 {
			t.Errorf("committed offsets sum to %d after shutdown, want 1", at)
		}
	})
}

// groupState asks the broker for the service's consumer group state.
func groupState(t testing.TB, b *broker) string {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	req := kmsg.NewPtrDescribeGroupsRequest()
	req.Groups = []string{b.topic(consumerGroup)}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	resp, err := req.RequestWith(ctx, cl)
	if err != nil || len(resp.Groups) == 0 {
		return ""
	}
	return resp.Groups[0].State
}

// Requests held inside the handler when SIGTERM arrives are finished and
// answered, not cut: the test holds their idempotency keys' rows in an open
// transaction, so their INSERT waits until it rolls back after the signal.
func TestShutdownAnswersRequestsInFlight(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	env := childEnvFor(dbURL, b)
	// Each request its own transaction, so that every held request shows
	// as a lock waiter in pg_stat_activity: then all are inside the handler.
	env["CREATE_BATCH_MAX"], env["CREATE_WRITERS"] = "1", "8"
	c := startChild(t, env)
	c.waitReady(t)
	user := newUser()
	do(t, "POST", c.url+"/orders", `{"amount": 1}`, "X-User-Id", user).order(t) // the schema exists

	const k = 8
	tx, err := schemaPool(t, dbURL).Begin(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(context.Background())
	for i := range k {
		if _, err := tx.Exec(context.Background(), `INSERT INTO orders (id, user_id, amount, idempotency_key, request_hash)
			VALUES ($1, $2, 1, $3, '\x00')`, newUUID(), user, fmt.Sprint("held-", i)); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	answers := make([]string, k)
	for i := range k {
		wg.Go(func() {
			req, _ := http.NewRequest("POST", c.url+"/orders", strings.NewReader(`{"amount": 9}`))
			req.Header.Set("X-User-Id", user)
			req.Header.Set("Idempotency-Key", fmt.Sprint("held-", i))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				answers[i] = err.Error()
				return
			}
			resp.Body.Close()
			answers[i] = resp.Status
		})
	}
	waitFor(t, 5*time.Second, "every request waiting on its held key", func() bool {
		return count(t, dbURL, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`) == k
	})
	if err := c.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "shutdown begun", func() bool { return strings.Contains(c.out.String(), "shutting down") })
	if err := tx.Rollback(context.Background()); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	<-c.done
	for i, a := range answers {
		if a != "201 Created" {
			t.Errorf("request %d held across SIGTERM: %s, want 201 Created", i, a)
		}
	}
	if n := count(t, dbURL, `SELECT count(*) FROM orders WHERE amount = 9`); n != k {
		t.Errorf("%d of the %d held orders stored", n, k)
	}
}

// Every drop of the LISTEN connection is followed by a reconnect within a
// second, however many came before (the backoff counts failures in a row).
func TestListenReconnectsPromptlyAfterEveryDrop(t *testing.T) {
	db := schemaPool(t, newSchema(t))
	n := newNotifier(db, testLogger(t), nil, outboxChannel)
	connected, unsubscribe := n.subscribe(outboxChannel, "")
	defer unsubscribe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.run(ctx)
	}()
	defer func() {
		cancel()
		<-done
	}()
	<-connected // each (re)connect signals every subscriber
	for i := range 10 {
		if _, err := testDB.Exec(context.Background(), `SELECT pg_terminate_backend(pid) FROM pg_stat_activity
			WHERE datname = current_database() AND application_name = $1`, listenApplicationName); err != nil {
			t.Fatal(err)
		}
		dropped := time.Now()
		select {
		case <-connected:
		case <-time.After(5 * time.Second):
			t.Fatalf("drop %d: no reconnect within 5s", i+1)
		}
		if d := time.Since(dropped); d > time.Second {
			t.Errorf("drop %d: reconnected after %s, want within 1s", i+1, d.Round(time.Millisecond))
		}
	}
}

// testLogger writes to the test's log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, nil))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}
