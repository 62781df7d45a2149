package main

// helpers_test.go is what the tests share: the test database and a schema
// per test, a broker per test, the service started in process or as a child
// process, HTTP calls, reading and writing topics, and waiting for a
// condition instead of sleeping.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
)

var (
	testDBURL string        // the database created for this run
	testDB    *pgxpool.Pool // for assertions on rows
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		childMain() // this binary was re-executed as the service (crash tests)
		return
	}
	os.Exit(withTestDatabase(m))
}

// withTestDatabase creates a fresh database for the run (TEST_DATABASE_URL,
// or libpq's defaults: PGHOST, PGUSER, ...) and drops it afterwards.
func withTestDatabase(m *testing.M) int {
	ctx := context.Background()
	base := os.Getenv("TEST_DATABASE_URL")
	admin, err := pgx.Connect(ctx, withParam(base, "connect_timeout", "5"))
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: no PostgreSQL reachable (%s): start it or set TEST_DATABASE_URL, e.g. postgres://user@localhost:5432/postgres\n", oneLine(err))
		return 1
	}
	name := "order_service_test_" + randomHex(6)
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: create test database: %v\n", err)
		return 1
	}
	defer func() {
		// FORCE ends the sessions a test left behind. It refuses, unless
		// run by a superuser, when an autovacuum worker is in the database
		// (42501), as after the benchmarks' inserts; a plain DROP stops
		// autovacuum itself.
		_, err := admin.Exec(ctx, "DROP DATABASE "+name+" WITH (FORCE)")
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42501" {
			_, err = admin.Exec(ctx, "DROP DATABASE "+name)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "drop test database %s: %v\n", name, err)
		}
		admin.Close(ctx)
	}()
	testDBURL = withParam(base, "dbname", name)
	testDB, err = pgxpool.New(ctx, testDBURL)
	if err != nil {
		fmt.Fprintf(os.Stderr, "FAIL: connect to test database: %v\n", err)
		return 1
	}
	defer testDB.Close()
	return m.Run()
}

// withParam sets a connection parameter in either form of connection string.
func withParam(conn, key, value string) string {
	if strings.HasPrefix(conn, "postgres://") || strings.HasPrefix(conn, "postgresql://") {
		u, err := url.Parse(conn)
		if err != nil {
			panic(err)
		}
		if key == "dbname" {
			u.Path = "/" + value
		} else {
			q := u.Query()
			q.Set(key, value)
			u.RawQuery = q.Encode()
		}
		return u.String()
	}
	return strings.TrimSpace(conn + " " + key + "=" + value)
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// newSchema gives a test its own schema in the run's database, so that tests
// never see each other's orders or outbox rows.
func newSchema(t testing.TB) string {
	t.Helper()
	return newSchemaURL(createSchema(t))
}

func newSchemaURL(schema string) string { return withParam(testDBURL, "search_path", schema) }

func createSchema(t testing.TB) string {
	t.Helper()
	schema := "t_" + randomHex(6)
	if _, err := testDB.Exec(context.Background(), "CREATE SCHEMA "+schema); err != nil {
		t.Fatalf("create schema: %v", err)
	}
	return schema
}

// broker is the Kafka cluster of one test.
type broker struct {
	addrs   []string
	prefix  string // topic and group prefix, unique per test
	gate    *gate  // nil for an external cluster
	cluster *kfake.Cluster
}

func (b *broker) topic(name string) string { return b.prefix + name }

// newBroker starts an in-process kfake cluster behind a gate the test can
// close, or uses KAFKA_BROKERS with unique topic names. Tests that cut the
// broker ask for faults=true and always get kfake.
func newBroker(t testing.TB, faults bool) *broker {
	t.Helper()
	prefix := "t" + randomHex(4) + "."
	if ext := os.Getenv("KAFKA_BROKERS"); ext != "" && !faults {
		return &broker{addrs: strings.Split(ext, ","), prefix: prefix}
	}
	g := &gate{conns: map[net.Conn]bool{}}
	c, err := kfake.NewCluster(
		kfake.NumBrokers(1),
		kfake.ListenFn(func(network, addr string) (net.Listener, error) {
			ln, err := net.Listen(network, addr)
			if err != nil {
				return nil, err
			}
			g.Listener = ln
			return g, nil
		}),
		kfake.SeedTopics(3, prefix+topicPayOrder, prefix+topicPaymentResults, prefix+topicPaymentDLQ),
		// The service sets its group's KIP-848 session itself
		// (setGroupSession); the broker's default stays Kafka's 45 s, so
		// that a test sees it if the service does not. kfake takes the
		// heartbeat interval from the broker alone: the one the service
		// would set for serviceEnv's 6 s.
		kfake.BrokerConfigs(map[string]string{"group.consumer.heartbeat.interval.ms": "1200"}),
	)
	if err != nil {
		t.Fatalf("kfake: %v", err)
	}
	t.Cleanup(c.Close)
	return &broker{addrs: c.ListenAddrs(), prefix: prefix, gate: g, cluster: c}
}

// gate is a listener whose connections the test can cut: while closed, every
// connection is dropped as soon as it is accepted, as if the broker were down.
type gate struct {
	net.Listener
	mu     sync.Mutex
	closed bool
	conns  map[net.Conn]bool
}

func (g *gate) Accept() (net.Conn, error) {
	for {
		c, err := g.Listener.Accept()
		if err != nil {
			return nil, err
		}
		g.mu.Lock()
		if g.closed {
			g.mu.Unlock()
			c.Close()
			continue
		}
		g.conns[c] = true
		g.mu.Unlock()
		return c, nil
	}
}

func (g *gate) setDown(down bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closed = down
	if down {
		for c := range g.conns {
			c.Close()
		}
		clear(g.conns)
	}
}

// service is one running instance of the program.
type service struct {
	url    string
	logs   *logBuffer
	cancel context.CancelFunc
	done   chan error
}

type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// listeningRE finds the listen address in text or JSON logs (LOG_FORMAT).
var listeningRE = regexp.MustCompile(`msg"?[=:]"?http server listening"?[ ,]"?addr"?[=:]"?([^\s"]+)`)

// serviceEnv is the environment of a test instance on this database URL
// and broker.
func serviceEnv(dbURL string, b *broker) map[string]string {
	return map[string]string{
		"HTTP_ADDR":           "127.0.0.1:0",
		"DATABASE_URL":        dbURL,
		"KAFKA_BROKERS":       strings.Join(b.addrs, ","),
		"KAFKA_TOPIC_PREFIX":  b.prefix,
		"DEMO_PAYMENTS":       "false",
		"RELAY_POLL_INTERVAL": "200ms",
		"STARTUP_TIMEOUT":     "10s",
		// Kafka's minimum: a SIGKILLed member's partitions move on in
		// seconds, not the default 45.
		"KAFKA_SESSION_TIMEOUT": "6s",
	}
}

// startService runs the program with env and waits until /healthz answers.
// It is stopped (and must stop cleanly) when the test ends.
func startService(t testing.TB, env map[string]string) *service {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := &service{logs: &logBuffer{}, cancel: cancel, done: make(chan error, 1)}
	go func() { s.done <- run(ctx, func(k string) string { return env[k] }, s.logs) }()
	t.Cleanup(func() {
		if err := s.stop(t); err != nil {
			t.Errorf("service stopped with error: %v", err)
		}
		if t.Failed() {
			t.Logf("service logs:\n%s", s.logs)
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for s.url == "" {
		if m := listeningRE.FindStringSubmatch(s.logs.String()); m != nil {
			s.url = "http://" + m[1]
			break
		}
		select {
		case err := <-s.done:
			s.done <- err
			t.Fatalf("service exited during start: %v\n%s", err, s.logs)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("service did not start listening:\n%s", s.logs)
		}
	}
	waitFor(t, 10*time.Second, "service /healthz", func() bool {
		resp, err := http.Get(s.url + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return s
}

// stop cancels the service and waits for run to return; it is idempotent.
func (s *service) stop(t testing.TB) error {
	s.cancel()
	select {
	case err := <-s.done:
		s.done <- err
		return err
	case <-time.After(20 * time.Second):
		t.Fatalf("service did not stop within 20s:\n%s", s.logs)
		return nil
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) json(t testing.TB, v any) {
	t.Helper()
	if err := json.Unmarshal(r.body, v); err != nil {
		t.Fatalf("decode %s: %v", r.body, err)
	}
}

func (r response) order(t testing.TB) Order {
	t.Helper()
	var o Order
	r.json(t, &o)
	return o
}

// do sends one request; headers alternate name, value.
func do(t testing.TB, method, url, body string, headers ...string) response {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Add(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read %s %s: %v", method, url, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: b}
}

func (s *service) createOrder(t testing.TB, user string, amount int64) Order {
	t.Helper()
	r := do(t, "POST", s.url+"/orders", fmt.Sprintf(`{"amount": %d}`, amount), "X-User-Id", user)
	if r.status != http.StatusCreated {
		t.Fatalf("POST /orders: %d %s", r.status, r.body)
	}
	return r.order(t)
}

func (s *service) getOrder(t testing.TB, user, id string) Order {
	t.Helper()
	r := do(t, "GET", s.url+"/orders/"+id, "", "X-User-Id", user)
	if r.status != http.StatusOK {
		t.Fatalf("GET /orders/%s: %d %s", id, r.status, r.body)
	}
	return r.order(t)
}

// payOrderRecord is a pay-order record as the tests read it back.
type payOrderRecord struct {
	EventID   string    `json:"event_id"`
	OrderID   string    `json:"order_id"`
	UserID    string    `json:"user_id"`
	Amount    int64     `json:"amount"`
	CreatedAt time.Time `json:"created_at"`
	key       string
	header    string // event-id header
}

// readTopic consumes topic from the start until done says so or the timeout
// passes, and returns every record seen.
func readTopic(t testing.TB, b *broker, topic string, timeout time.Duration, done func([]*kgo.Record) bool) []*kgo.Record {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.addrs...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var recs []*kgo.Record
	for !done(recs) {
		fetches := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("timed out after %s reading %s; got %d records", timeout, topic, len(recs))
		}
		recs = append(recs, fetches.Records()...)
	}
	return recs
}

// readPayOrders waits until every order id in want has a pay-order record.
func readPayOrders(t testing.TB, b *broker, want []string, timeout time.Duration) []payOrderRecord {
	t.Helper()
	wantSet := map[string]bool{}
	for _, id := range want {
		wantSet[id] = true
	}
	var out []payOrderRecord
	readTopic(t, b, b.topic(topicPayOrder), timeout, func(recs []*kgo.Record) bool {
		out = out[:0]
		seen := map[string]bool{}
		for _, r := range recs {
			var p payOrderRecord
			if err := json.Unmarshal(r.Value, &p); err != nil {
				t.Fatalf("pay-order value %s: %v", r.Value, err)
			}
			p.key = string(r.Key)
			for _, h := range r.Headers {
				if h.Key == "event-id" {
					p.header = string(h.Value)
				}
			}
			if wantSet[p.OrderID] {
				out = append(out, p)
				seen[p.OrderID] = true
			}
		}
		return len(seen) == len(wantSet)
	})
	return out
}

func produce(t testing.TB, b *broker, topic, key string, values ...string) {
	t.Helper()
	var recs []*kgo.Record
	for _, v := range values {
		recs = append(recs, &kgo.Record{Topic: topic, Key: []byte(key), Value: []byte(v)})
	}
	produceRecords(t, b, recs...)
}

// producePaid writes a PAID payment result for each id.
func producePaid(t testing.TB, b *broker, ids ...string) {
	t.Helper()
	var recs []*kgo.Record
	for _, id := range ids {
		recs = append(recs, &kgo.Record{Topic: b.topic(topicPaymentResults), Key: []byte(id),
			Value: []byte(`{"order_id": "` + id + `", "status": "PAID"}`)})
	}
	produceRecords(t, b, recs...)
}

// produceRecords writes records as they are, with a client that accepts
// batches up to the broker's own limit (1 MiB), larger than the service's.
func produceRecords(t testing.TB, b *broker, recs ...*kgo.Record) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.addrs...), kgo.ProducerBatchMaxBytes(1_048_000))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		t.Fatalf("produce: %v", err)
	}
}

// runScript runs one of the repository's scripts (.ci/kafka.sh,
// .ci/postgres.sh) and returns its output; a failure ends the test with the
// script's stderr.
func runScript(t testing.TB, env []string, script string, args ...string) string {
	t.Helper()
	cmd := exec.Command(script, args...)
	cmd.Env = env
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("%s %v: %v\n%s%s", script, args, err, out, stderr)
	}
	return string(out)
}

// count runs a count query on the test database.
func count(t testing.TB, dbURL, query string, args ...any) int {
	t.Helper()
	db := schemaPool(t, dbURL)
	var n int
	if err := db.QueryRow(context.Background(), query, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

// tableStat is a column of pg_stat_user_tables for a table of the test's
// schema. A backend publishes its statistics up to 10 s late: wait for a
// figure the test knows (rows updated, deleted) before trusting another.
func tableStat(t testing.TB, dbURL, table, column string) int {
	t.Helper()
	return count(t, dbURL, `SELECT coalesce(`+column+`, 0) FROM pg_stat_user_tables
		WHERE schemaname = current_schema() AND relname = $1`, table)
}

var (
	poolsMu sync.Mutex
	pools   = map[string]*pgxpool.Pool{}
)

// schemaPool is a pool on one test's schema, shared by its assertions.
func schemaPool(t testing.TB, dbURL string) *pgxpool.Pool {
	t.Helper()
	poolsMu.Lock()
	defer poolsMu.Unlock()
	if p := pools[dbURL]; p != nil {
		return p
	}
	p, err := pgxpool.New(context.Background(), dbURL)
	if err != nil {
		t.Fatal(err)
	}
	pools[dbURL] = p
	t.Cleanup(func() {
		poolsMu.Lock()
		delete(pools, dbURL)
		poolsMu.Unlock()
		p.Close()
	})
	return p
}

func newUser() string { return "user-" + randomHex(4) }

// waitCommitted waits until the service's group has committed every record of
// payment-results: each one was applied (or dead-lettered) and acknowledged.
func waitCommitted(t testing.TB, b *broker) {
	t.Helper()
	adm, closeAdm := adminClient(t, b)
	defer closeAdm()
	topic := b.topic(topicPaymentResults)
	waitFor(t, 15*time.Second, "consumer offsets committed to the end of "+topic, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		ends, err := adm.ListEndOffsets(ctx, topic)
		if err != nil {
			return false
		}
		committed, err := adm.FetchOffsets(ctx, b.topic(consumerGroup))
		if err != nil {
			return false
		}
		ok := true
		ends.Each(func(o kadm.ListedOffset) {
			c, found := committed.Lookup(o.Topic, o.Partition)
			if o.Offset > 0 && (!found || c.At < o.Offset) {
				ok = false
			}
		})
		return ok
	})
}

// headerMap is a record's headers by key.
func headerMap(r *kgo.Record) map[string]string {
	h := map[string]string{}
	for _, kv := range r.Headers {
		h[kv.Key] = string(kv.Value)
	}
	return h
}

// readTopicNow returns every record currently in topic.
func readTopicNow(t testing.TB, b *broker, topic string) []*kgo.Record {
	t.Helper()
	total := endOffsets(t, b, topic)
	return readTopic(t, b, topic, 10*time.Second, func(recs []*kgo.Record) bool { return int64(len(recs)) >= total })
}

// endOffsets sums the end offsets of topic's partitions: how many records
// it holds.
func endOffsets(t testing.TB, b *broker, topic string) int64 {
	t.Helper()
	adm, closeAdm := adminClient(t, b)
	defer closeAdm()
	return countRecords(t, adm, topic)
}

// adminClient is a Kafka admin client on b, closed by the returned func.
func adminClient(t testing.TB, b *broker) (*kadm.Client, func()) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.addrs...))
	if err != nil {
		t.Fatal(err)
	}
	return kadm.NewClient(cl), cl.Close
}

// countRecords is endOffsets on a client of the caller's.
func countRecords(t testing.TB, adm *kadm.Client, topic string) int64 {
	t.Helper()
	ends, err := adm.ListEndOffsets(context.Background(), topic)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		t.Fatalf("end offsets of %s: %v", topic, err)
	}
	var sum int64
	ends.Each(func(o kadm.ListedOffset) { sum += o.Offset })
	return sum
}

// stream opens GET /orders/{id}/events and delivers its events until the
// server ends the stream (the channel closes) or the test ends.
func stream(t testing.TB, baseURL, user, id string) (*http.Response, <-chan sseEvent) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, "GET", baseURL+"/orders/"+id+"/events", nil)
	req.Header.Set("X-User-Id", user)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	events := make(chan sseEvent, 16)
	go func() {
		defer close(events)
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		var ev sseEvent
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "":
				if ev.name != "" || ev.data != "" {
					events <- ev
				}
				ev = sseEvent{}
			case strings.HasPrefix(line, "event: "):
				ev.name = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				ev.data = strings.TrimPrefix(line, "data: ")
			}
		}
	}()
	return resp, events
}

func nextEvent(t testing.TB, events <-chan sseEvent, timeout time.Duration) (Order, bool) {
	t.Helper()
	select {
	case ev, ok := <-events:
		if !ok {
			return Order{}, false
		}
		var o Order
		if ev.name != "status" || json.Unmarshal([]byte(ev.data), &o) != nil {
			t.Fatalf("unexpected event %+v", ev)
		}
		return o, true
	case <-time.After(timeout):
		t.Fatalf("no event within %s", timeout)
		return Order{}, false
	}
}

// writeBatch sends requests through one orderWriter transaction.
func writeBatch(t testing.TB, w *orderWriter, ins ...newOrder) []createResult {
	t.Helper()
	var batch []*createRequest
	for _, in := range ins {
		batch = append(batch, &createRequest{ctx: context.Background(), in: in, done: make(chan createResult, 1)})
	}
	w.write(batch)
	out := make([]createResult, len(ins))
	for _, r := range batch {
		for i, in := range ins {
			if in.ID == r.in.ID {
				out[i] = <-r.done
			}
		}
	}
	return out
}

// watchDeleted polls the outbox every 5ms, from now on, for the rows of the
// given keys (order ids); the func it returns waits until all are gone and
// says when the first went. The relay deletes a row as soon as the broker has
// acknowledged its event, so that is when the first was published, within
// the polling period and the delete's round trip.
func watchDeleted(t testing.TB, dbURL string, keys ...string) func() time.Time {
	t.Helper()
	db := schemaPool(t, dbURL)
	first := make(chan time.Time, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		seen := false
		for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			var left int
			if err := db.QueryRow(context.Background(), `SELECT count(*) FROM outbox WHERE key = ANY($1)`, keys).Scan(&left); err != nil {
				continue
			}
			if left < len(keys) && !seen {
				seen = true
				first <- time.Now()
			}
			if left == 0 {
				return
			}
		}
	}()
	return func() time.Time {
		<-done
		select {
		case at := <-first:
			return at
		default:
			t.Fatalf("the outbox rows of %v were not deleted within 90s", keys)
			return time.Time{}
		}
	}
}

// schemaWithTables creates a schema holding the service's tables, for a test
// that writes rows before any service starts on it.
func schemaWithTables(t testing.TB) (schema, dbURL string, db *pgxpool.Pool) {
	t.Helper()
	schema = createSchema(t)
	dbURL = newSchemaURL(schema)
	db = schemaPool(t, dbURL)
	if err := applySchema(context.Background(), db); err != nil {
		t.Fatal(err)
	}
	return schema, dbURL, db
}

// groupMembers is the number of members of a consumer group and its state,
// whichever protocol it runs.
func groupMembers(t testing.TB, adm *kadm.Client, group string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if next, err := adm.DescribeConsumerGroups(ctx, group); err == nil && next[group].Err == nil {
		return len(next[group].Members), next[group].State
	}
	classic, err := adm.DescribeGroups(ctx, group)
	if err != nil {
		t.Fatal(err)
	}
	return len(classic[group].Members), classic[group].State
}

// groupAssignments describes a consumer group for a failure message: each
// member's assignment and, under KIP-848, its target; with the classic
// protocol, only the members.
func groupAssignments(t testing.TB, adm *kadm.Client, group string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var b strings.Builder
	if next, err := adm.DescribeConsumerGroups(ctx, group); err == nil && next[group].Err == nil {
		g := next[group]
		fmt.Fprintf(&b, "state %s, epoch %d", g.State, g.Epoch)
		for _, m := range g.Members {
			fmt.Fprintf(&b, "; member %s epoch %d assigned %v target %v", m.MemberID, m.MemberEpoch,
				m.Assignment.Sorted(), m.TargetAssignment.Sorted())
		}
		return b.String()
	}
	n, state := groupMembers(t, adm, group)
	return fmt.Sprintf("state %s, %d members (classic)", state, n)
}

// waitOwning waits until each replica owns a partition of payment-results.
func waitOwning(t testing.TB, urls ...string) {
	t.Helper()
	waitFor(t, 60*time.Second, "each replica owning a partition of payment-results", func() bool {
		for _, u := range urls {
			if metric(t, u, "payment_results_partitions_owned") == 0 {
				return false
			}
		}
		return true
	})
}

// holdHorizon holds vacuum's xmin horizon in the test database until the
// test ends, as a long report, pg_dump or a session left idle in a
// transaction would: a REPEATABLE READ transaction that has taken its
// snapshot and, with withXID, a transaction id of its own too (as one that
// has written would hold). Nothing deleted after it began can be removed
// while it lasts. It returns the transaction id it holds, if any.
func holdHorizon(t testing.TB, withXID bool) uint64 {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, testDBURL)
	if err != nil {
		t.Fatal(err)
	}
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		tx.Rollback(ctx) //nolint:errcheck // ends the hold
		conn.Close(ctx)
	})
	var xid uint64
	query := `SELECT '0'::xid8`
	if withXID {
		query = `SELECT pg_current_xact_id()`
	}
	if err := tx.QueryRow(ctx, query).Scan(&xid); err != nil {
		t.Fatal(err)
	}
	var held bool
	if err := tx.QueryRow(ctx, `SELECT backend_xmin IS NOT NULL FROM pg_stat_activity WHERE pid = pg_backend_pid()`).Scan(&held); err != nil || !held {
		t.Fatalf("the holding session has no xmin: %v", err)
	}
	return xid
}

// indexStat is a column of pg_stat_user_indexes for an index of the test's
// schema. Like tableStat, it lags behind the backends that do the reading.
func indexStat(t testing.TB, dbURL, index, column string) int {
	t.Helper()
	return count(t, dbURL, `SELECT coalesce(`+column+`, 0) FROM pg_stat_user_indexes
		WHERE schemaname = current_schema() AND indexrelname = $1`, index)
}

// waitClaimed waits until some outbox row is claimed: the relay has leased it
// and waits on the broker.
func waitClaimed(t testing.TB, dbURL string) {
	t.Helper()
	waitFor(t, 10*time.Second, "the relay holding claimed rows", func() bool {
		return count(t, dbURL, `SELECT count(*) FROM outbox WHERE lease_until > now()`) > 0
	})
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

// child is the service running as a separate process (this test binary,
// re-executed), so a test can SIGKILL or SIGTERM it.
type child struct {
	cmd    *exec.Cmd
	url    string
	out    *logBuffer
	stderr *logBuffer
	done   chan struct{}
	err    error
}

// startChild starts the service with env (HTTP_ADDR must name a port).
func startChild(t testing.TB, env map[string]string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	// The race detector sleeps a second at exit unless told not to; the
	// shutdown tests time the exit.
	cmd.Env = append(os.Environ(), childEnv+"=1", "GORACE=atexit_sleep_ms=0")
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	c := &child{cmd: cmd, url: "http://" + env["HTTP_ADDR"], out: &logBuffer{}, stderr: &logBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = c.out, c.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start child: %v", err)
	}
	go func() {
		c.err = cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-c.done
		if t.Failed() {
			t.Logf("child logs:\n%s%s", c.out, c.stderr)
		}
	})
	return c
}

func (c *child) waitReady(t testing.TB) {
	t.Helper()
	waitFor(t, 20*time.Second, "child /healthz", func() bool {
		select {
		case <-c.done:
			t.Fatalf("child exited during start: %v\n%s%s", c.err, c.out, c.stderr)
		default:
		}
		resp, err := http.Get(c.url + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

func (c *child) kill(t testing.TB) {
	t.Helper()
	if err := c.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("kill child: %v", err)
	}
	<-c.done
}

// sigterm sends SIGTERM and waits for the exit, failing the test if none
// comes within wait; it returns how long the exit took.
func (c *child) sigterm(t testing.TB, wait time.Duration) time.Duration {
	t.Helper()
	signalled := time.Now()
	if err := c.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.done:
	case <-time.After(wait):
		t.Fatalf("still running %s after SIGTERM", wait)
	}
	return time.Since(signalled)
}

func childEnvFor(dbURL string, b *broker) map[string]string {
	env := serviceEnv(dbURL, b)
	env["HTTP_ADDR"] = "127.0.0.1:" + freePort()
	return env
}

func freePort() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

// metric reads one sample of the service's /metrics.
func metric(t testing.TB, baseURL, sample string) float64 {
	t.Helper()
	r := do(t, "GET", baseURL+"/metrics", "")
	for _, line := range strings.Split(string(r.body), "\n") {
		if v, ok := strings.CutPrefix(line, sample+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric %s: %v", line, err)
			}
			return f
		}
	}
	t.Fatalf("no sample %s in /metrics:\n%s", sample, r.body)
	return 0
}

func orderIDs(t testing.TB, dbURL string) []string {
	t.Helper()
	rows, err := schemaPool(t, dbURL).Query(context.Background(), `SELECT id::text FROM orders`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return ids
}

// committedAt sums the group's committed offsets on payment-results.
func committedAt(t testing.TB, b *broker) int64 {
	t.Helper()
	adm, closeAdm := adminClient(t, b)
	defer closeAdm()
	offs, err := adm.FetchOffsets(context.Background(), b.topic(consumerGroup))
	if err != nil {
		t.Fatal(err)
	}
	var sum int64
	offs.Each(func(o kadm.OffsetResponse) {
		if o.Topic == b.topic(topicPaymentResults) && o.At > 0 {
			sum += o.At
		}
	})
	return sum
}

// createPromptly creates n orders and wants each answered within 1s, whatever
// Kafka is doing: the outbox, not the broker, is on a request's path.
func createPromptly(t *testing.T, s *service, user string, n int, while string) []string {
	t.Helper()
	var ids []string
	for range n {
		start := time.Now()
		ids = append(ids, s.createOrder(t, user, 2).ID)
		if d := time.Since(start); d > time.Second {
			t.Errorf("POST took %s %s", d, while)
		}
	}
	return ids
}

func waitDrained(t *testing.T, dbURL string) {
	t.Helper()
	waitFor(t, 10*time.Second, "outbox drained", func() bool {
		return count(t, dbURL, `SELECT count(*) FROM outbox`) == 0
	})
}

// insertEvents commits n events for topic (keys "1" to "n") in one statement
// and wakes the relay: a backlog that appears at once, as after an outage.
func insertEvents(t testing.TB, dbURL, topic string, n int) {
	t.Helper()
	if _, err := schemaPool(t, dbURL).Exec(context.Background(), `
		WITH e AS (
		    INSERT INTO outbox (topic, key, event_id, payload)
		    SELECT $1, g::text, gen_random_uuid(), '{}' FROM generate_series(1, $2::int) AS g
		)
		SELECT pg_notify($3, '')`, topic, n, outboxChannel); err != nil {
		t.Fatal(err)
	}
}

// startStack starts what most tests need: a broker (in process, or
// KAFKA_BROKERS'), a fresh schema, and the service on them.
func startStack(t testing.TB) (b *broker, dbURL string, s *service) {
	t.Helper()
	return startStackWith(t, nil)
}

// startStackWith is startStack with settings added to the service's
// environment.
func startStackWith(t testing.TB, settings map[string]string) (b *broker, dbURL string, s *service) {
	t.Helper()
	b = newBroker(t, false)
	dbURL = newSchema(t)
	env := serviceEnv(dbURL, b)
	maps.Copy(env, settings)
	return b, dbURL, startService(t, env)
}
