package main

// A PostgreSQL failover, the HA setup docs/operations.md supports: a primary
// with a synchronous standby (.ci/postgres.sh), DATABASE_URL naming both with
// target_session_attrs=read-write. The primary is SIGKILLed and the standby
// promoted, as an operator or a failover manager would.

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// pgPair is a primary and its synchronous standby of this test.
type pgPair struct {
	script, dir      string
	primary, standby string // host:port
	db               string // a database made for the test on the primary
}

func startPostgresPair(t *testing.T) *pgPair {
	t.Helper()
	script := os.Getenv("POSTGRES_SCRIPT")
	if script == "" {
		t.Skip("POSTGRES_SCRIPT is not set (.ci/run sets it to .ci/postgres.sh): no primary and standby to fail over")
	}
	p := &pgPair{script: script, dir: filepath.Join(os.TempDir(), "order-service-pg-"+randomHex(4)), db: "orders"}
	t.Cleanup(func() {
		if t.Failed() {
			for _, log := range []string{"primary.log", "standby.log"} {
				b, _ := os.ReadFile(filepath.Join(p.dir, log))
				t.Logf("%s:\n%s", log, b)
			}
		}
		p.run(t, "stop")
		os.RemoveAll(p.dir)
	})
	hosts := strings.Split(strings.TrimSpace(p.run(t, "start")), ",")
	p.primary, p.standby = hosts[0], hosts[1]
	conn, err := pgx.Connect(context.Background(), "postgres://postgres@"+p.primary+"/postgres?sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(context.Background(), "CREATE DATABASE "+p.db); err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *pgPair) run(t *testing.T, cmd string) string {
	t.Helper()
	return runScript(t, os.Environ(), p.script, cmd, p.dir)
}

// url is the test database on hosts: one host:port, or several,
// comma-separated, as DATABASE_URL names a primary and its standby.
func (p *pgPair) url(hosts string) string {
	return fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable&target_session_attrs=read-write&connect_timeout=2", hosts, p.db)
}

// failoverLoad is clients that each create orders with an Idempotency-Key,
// retrying one on 503 until it is acknowledged, and what they were answered.
type failoverLoad struct {
	acked, answered503, noRetryAfter, other atomic.Int64
	mu                                      sync.Mutex
	ids                                     []string    // orders acknowledged (201, or 200 for a replay)
	created                                 []time.Time // when each 201 came
}

// order creates one order, retrying on 503, until it is acknowledged (60 s
// at most).
func (l *failoverLoad) order(t *testing.T, url, user string) {
	key := "k-" + randomHex(8)
	give := time.Now().Add(60 * time.Second)
	for time.Now().Before(give) {
		r := do(t, "POST", url+"/orders", `{"amount": 7}`, "X-User-Id", user, "Idempotency-Key", key)
		switch r.status {
		case http.StatusCreated, http.StatusOK:
			o := r.order(t)
			l.mu.Lock()
			l.ids = append(l.ids, o.ID)
			if r.status == http.StatusCreated {
				l.created = append(l.created, time.Now())
			}
			l.mu.Unlock()
			l.acked.Add(1)
			return
		case http.StatusServiceUnavailable:
			l.answered503.Add(1)
			if r.header.Get("Retry-After") == "" {
				l.noRetryAfter.Add(1)
			}
			time.Sleep(100 * time.Millisecond) // a client honouring Retry-After would wait longer
		default:
			l.other.Add(1)
			t.Errorf("POST /orders answered %d %s during the failover", r.status, r.body)
			return
		}
	}
	t.Errorf("order with key %s never acknowledged", key)
}

// The primary is SIGKILLed under 50 orders/s and the standby promoted 4s
// later: every acknowledged order is on the new primary, published once and
// settled by its payment result; meanwhile the service answers 503 with
// Retry-After, never 500, and takes orders again as soon as the standby does.
func TestPostgresFailoverLosesNoAcknowledgedOrder(t *testing.T) {
	pair := startPostgresPair(t)
	b := newBroker(t, false)
	s := startService(t, serviceEnv(pair.url(pair.primary+","+pair.standby), b))
	user := newUser()

	load := &failoverLoad{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 5 { // 5 clients, an order each 100 ms
		wg.Go(func() {
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					load.order(t, s.url, user)
				}
			}
		})
	}
	time.Sleep(2 * time.Second) // load before the failure: the scenario, not a wait for a condition
	pair.run(t, "kill")
	killed := time.Now()
	// The failover manager's detection time, longer than a request waits
	// for the database (requestDBTimeout): some requests must get 503.
	time.Sleep(4 * time.Second)
	pair.run(t, "promote")
	promoted := time.Now()
	time.Sleep(3 * time.Second) // load on the new primary
	close(stop)
	wg.Wait()

	var first time.Time
	for _, at := range load.created {
		if at.After(promoted) && (first.IsZero() || at.Before(first)) {
			first = at
		}
	}
	t.Logf("failover: %d orders acknowledged, %d answers 503 (%d without Retry-After), %d others; promoted %s after the kill; first 201 %s after the promotion",
		load.acked.Load(), load.answered503.Load(), load.noRetryAfter.Load(), load.other.Load(),
		promoted.Sub(killed).Round(time.Millisecond), first.Sub(promoted).Round(time.Millisecond))
	if first.IsZero() || first.Sub(promoted) > 2*time.Second {
		t.Errorf("first 201 %s after the promotion, want within 2s", first.Sub(promoted).Round(time.Millisecond))
	}
	if load.answered503.Load() == 0 || load.noRetryAfter.Load() != 0 {
		t.Errorf("%d answers 503, %d of them without Retry-After; want some, all with it", load.answered503.Load(), load.noRetryAfter.Load())
	}

	newPrimary := pair.url(pair.standby)
	if n := count(t, newPrimary, `SELECT count(*) FROM orders WHERE id = ANY($1::uuid[])`, load.ids); n != len(load.ids) {
		t.Errorf("%d of %d acknowledged orders on the new primary", n, len(load.ids))
	}
	if n := count(t, newPrimary, `SELECT count(*) FROM orders`); n != len(load.ids) {
		t.Errorf("%d orders on the new primary for %d acknowledged keys", n, len(load.ids))
	}
	recs := readPayOrders(t, b, load.ids, 60*time.Second)
	seen := map[string]bool{}
	for _, r := range recs {
		if seen[r.OrderID] {
			t.Errorf("order %s published twice", r.OrderID)
		}
		seen[r.OrderID] = true
	}
	payAndWait(t, b, newPrimary, load.ids)
}

// payAndWait sends a PAID result for every id and waits until each is
// applied on the database of dbURL.
func payAndWait(t *testing.T, b *broker, dbURL string, ids []string) {
	t.Helper()
	producePaid(t, b, ids...)
	waitFor(t, 60*time.Second, "every acknowledged order PAID on the new primary", func() bool {
		return count(t, dbURL, `SELECT count(*) FROM orders WHERE status = 'PAID' AND id = ANY($1::uuid[])`, ids) == len(ids)
	})
}

// An order's COMMIT reaches the primary and commits there and on the
// standby, and its answer is lost: the connection stays silent while the
// primary is killed and the standby promoted, then breaks. The order writer
// settles the outcome against the promoted standby (orderWriter.settle): the
// client gets 201, and the order is published and settled.
func TestPostgresFailoverSettlesALostCommitOnThePromotedStandby(t *testing.T) {
	pair := startPostgresPair(t)
	b := newBroker(t, false)
	cut := newCommitCutter(t, pair.primary)
	s := startService(t, serviceEnv(pair.url(cut.addr()+","+pair.standby), b))
	user := newUser()
	warm := s.createOrder(t, user, 1) // the pool is up, through the cutter

	cut.arm("lost-commit")
	answer := make(chan response, 1)
	go func() {
		answer <- do(t, "POST", s.url+"/orders", `{"amount": 8}`, "X-User-Id", user, "Idempotency-Key", "lost-commit")
	}()
	select {
	case <-cut.committed:
	case <-time.After(10 * time.Second):
		t.Fatal("no COMMIT went through the cutter")
	}
	pair.run(t, "kill")
	pair.run(t, "promote")
	cut.breakHeld()
	r := <-answer
	if r.status != http.StatusCreated {
		t.Fatalf("POST /orders answered %d %s, want 201: the lost COMMIT was settled on the promoted standby", r.status, r.body)
	}
	o := r.order(t)
	if n := metric(t, s.url, "order_commits_unanswered_total"); n != 1 {
		t.Errorf("order_commits_unanswered_total %v, want 1: the answer was to be settled, not read", n)
	}
	newPrimary := pair.url(pair.standby)
	if n := count(t, newPrimary, `SELECT count(*) FROM orders WHERE id = $1`, o.ID); n != 1 {
		t.Errorf("order %s not on the new primary", o.ID)
	}
	readPayOrders(t, b, []string{warm.ID, o.ID}, 30*time.Second)
	payAndWait(t, b, newPrimary, []string{warm.ID, o.ID})
}

// commitCutter forwards connections to a PostgreSQL server. Once armed with
// a marker, the first connection that sends the marker (an order's
// Idempotency-Key, among the statement's parameters) and is then answered a
// COMMIT (CommandComplete "COMMIT": the transaction committed, on the
// standby too) gets nothing more from the server: that answer and all after
// it are dropped, and the client's side stays open, silent, until breakHeld.
type commitCutter struct {
	p         *tcpProxy
	marker    atomic.Pointer[[]byte]
	committed chan struct{}
	held      chan net.Conn
}

func newCommitCutter(t *testing.T, server string) *commitCutter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &commitCutter{committed: make(chan struct{}), held: make(chan net.Conn, 1)}
	c.p = &tcpProxy{ln: ln, conns: map[net.Conn]bool{}, pipeFn: c.pipe,
		target: func() (net.Conn, error) { return net.DialTimeout("tcp", server, time.Second) }}
	go c.p.serve()
	t.Cleanup(func() {
		ln.Close()
		c.p.set(false)
	})
	return c
}

func (c *commitCutter) addr() string { return c.p.ln.Addr().String() }
func (c *commitCutter) arm(marker string) {
	b := []byte(marker)
	c.marker.Store(&b)
}

// breakHeld closes the held client connection.
func (c *commitCutter) breakHeld() { (<-c.held).Close() }

func (c *commitCutter) pipe(client net.Conn) {
	server, ok := c.p.connect(client)
	if !ok {
		return
	}
	var marked atomic.Bool
	go func() {
		buf := make([]byte, 32<<10)
		for {
			n, err := client.Read(buf)
			if m := c.marker.Load(); m != nil && bytes.Contains(buf[:n], *m) {
				marked.Store(true) // before the server can answer it
			}
			if _, werr := server.Write(buf[:n]); werr != nil || err != nil {
				server.Close()
				return
			}
		}
	}()
	// Server to client, one message at a time (sslmode=disable: every
	// message is a type byte and a length).
	r := &msgReader{r: server}
	for {
		typ, body, err := r.next()
		if err != nil {
			client.Close()
			return
		}
		if typ == 'C' && string(body) == "COMMIT\x00" && marked.Load() && c.marker.Swap(nil) != nil {
			close(c.committed)
			c.held <- client
			io.Copy(io.Discard, server) // until the server dies
			return
		}
		if _, err := client.Write(r.raw); err != nil {
			server.Close()
			return
		}
	}
}

// msgReader reads PostgreSQL backend messages.
type msgReader struct {
	r   io.Reader
	raw []byte // the last message, as read
}

func (m *msgReader) next() (byte, []byte, error) {
	head := make([]byte, 5)
	if _, err := io.ReadFull(m.r, head); err != nil {
		return 0, nil, err
	}
	n := int(binary.BigEndian.Uint32(head[1:])) - 4
	if n < 0 || n > 1<<24 {
		return 0, nil, fmt.Errorf("message length %d", n)
	}
	m.raw = make([]byte, 5+n)
	copy(m.raw, head)
	if _, err := io.ReadFull(m.r, m.raw[5:]); err != nil {
		return 0, nil, err
	}
	return head[0], m.raw[5:], nil
}
