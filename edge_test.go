package main

// edge_test.go: the HTTP edge against a careless or hostile client. Strict
// JSON and content types, paths in their canonical form, bodies that stall,
// ambiguous framing, users kept apart; and the live status of an order, its
// event streams a bounded resource.

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The body is strict JSON: a field in another case, a duplicate key or a lone
// surrogate is 400 naming it; a Content-Type other than JSON, none or curl's
// form type is 415.
func TestStrictJSONAndContentTypes(t *testing.T) {
	_, dbURL, s := startStack(t)
	user := newUser()
	for _, c := range []struct {
		name, body, contentType string
		status                  int
		detail                  string // a part of the problem's detail
	}{
		{"a field in another case, beside the real one", `{"amount": 5, "AMOUNT": 99999999}`, "", 400, `"AMOUNT", want "amount"`},
		{"a field in another case, alone", `{"Amount": 5}`, "", 400, `"Amount", want "amount"`},
		{"a field that folds to a known one (U+017F)", `{"amount": 5, "deſcription": "x"}`, "", 400, `"deſcription", want "description"`},
		{"a duplicate key", `{"amount": 5, "amount": 7}`, "", 400, `duplicate key "amount"`},
		{"a lone high surrogate", `{"amount": 5, "description": "a\ud800b"}`, "", 400, `lone surrogate escape \ud800`},
		{"a lone low surrogate", `{"amount": 5, "description": "\udc00"}`, "", 400, `lone surrogate escape \udc00`},
		{"a high surrogate then another escape", `{"amount": 5, "description": "\ud800\u0041"}`, "", 400, `lone surrogate`},
		{"text/plain", `{"amount": 5}`, "text/plain", 415, "application/json"},
		{"JSON in another charset", `{"amount": 5}`, "application/json; charset=latin1", 415, "application/json"},
		{"a malformed type", `{"amount": 5}`, "application/", 415, "application/json"},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := []string{"X-User-Id", user}
			if c.contentType != "" {
				h = append(h, "Content-Type", c.contentType)
			}
			r := do(t, "POST", s.url+"/orders", c.body, h...)
			var p problem
			r.json(t, &p)
			if r.status != c.status || r.header.Get("Content-Type") != "application/problem+json" || !strings.Contains(p.Detail, c.detail) {
				t.Errorf("%d %s %s, want %d problem+json naming %s", r.status, r.header.Get("Content-Type"), r.body, c.status, c.detail)
			}
			if c.status == 415 && r.header.Get("Accept") != "application/json" {
				t.Errorf("415 with Accept %q, want application/json", r.header.Get("Accept"))
			}
		})
	}
	if n := count(t, dbURL, `SELECT count(*) FROM orders`); n != 0 {
		t.Errorf("refused requests wrote %d orders", n)
	}
	// What stays accepted: a surrogate pair, and the types a client sends.
	for _, c := range []struct{ body, contentType, description string }{
		{`{"amount": 5, "description": "\ud83d\ude00 \\ud800"}`, "application/json", "😀 \\ud800"},
		{`{"amount": 5}`, "application/json; charset=UTF-8", ""},
		{`{"amount": 5}`, "", ""},
		{`{"amount": 5}`, "application/x-www-form-urlencoded", ""}, // what curl -d sends
	} {
		h := []string{"X-User-Id", user}
		if c.contentType != "" {
			h = append(h, "Content-Type", c.contentType)
		}
		r := do(t, "POST", s.url+"/orders", c.body, h...)
		if r.status != http.StatusCreated || r.order(t).Description != c.description {
			t.Errorf("%s as %q: %d %s, want 201 with description %q", c.body, c.contentType, r.status, r.body, c.description)
		}
	}
}

// The HTTP edge answers as the contract says: a path not in its canonical form
// is 404, never a redirect; a stalled body is 408 without addresses; a chunked
// request closes its connection; 401 names its challenge.
func TestEdgeAnswersAreTheContracts(t *testing.T) {
	_, dbURL, s := startStack(t)
	user := newUser()
	o := s.createOrder(t, user, 5)

	// Paths not in their canonical form are 404 problem+json, never a
	// redirect that a client would follow with its method and body.
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	for _, c := range []struct{ method, path string }{
		{"GET", "//orders"}, {"POST", "//orders"}, {"GET", "/orders/../healthz"},
		{"GET", "/orders/./" + o.ID}, {"GET", "/orders/%2e%2e/healthz"}, {"GET", "/orders//" + o.ID},
	} {
		req, _ := http.NewRequest(c.method, s.url+c.path, strings.NewReader(`{"amount": 6}`))
		req.Header.Set("X-User-Id", user)
		resp, err := noRedirect.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound || resp.Header.Get("Content-Type") != "application/problem+json" || resp.Header.Get("Location") != "" {
			t.Errorf("%s %s: %d %s Location %q, want 404 problem+json", c.method, c.path, resp.StatusCode,
				resp.Header.Get("Content-Type"), resp.Header.Get("Location"))
		}
	}
	if n := count(t, dbURL, `SELECT count(*) FROM orders WHERE amount = 6`); n != 0 {
		t.Errorf("POST //orders stored %d orders", n)
	}

	// 401 names its challenge.
	r := do(t, "GET", s.url+"/orders", "")
	if r.status != http.StatusUnauthorized || r.header.Get("WWW-Authenticate") != `X-User-Id realm="order-service"` {
		t.Errorf("no X-User-Id: %d, WWW-Authenticate %q", r.status, r.header.Get("WWW-Authenticate"))
	}

	// A body shorter than its Content-Length: 408 within the body's own
	// deadline, with no socket addresses, and the connection closed.
	addr := strings.TrimPrefix(s.url, "http://")
	status, header, body, closed := rawExchange(t, addr, "POST /orders HTTP/1.1\r\nHost: x\r\nX-User-Id: "+user+
		"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"amount\":", 10*time.Second)
	if status != http.StatusRequestTimeout || !strings.Contains(header, "application/problem+json") ||
		strings.Contains(body, "127.0.0.1") || !closed {
		t.Errorf("stalled body: %d, closed %v\n%s\n%s", status, closed, header, body)
	}

	// Content-Length and chunked Transfer-Encoding together: answered by the
	// chunked framing, and the connection closed (RFC 9112, section 6.3).
	status, header, body, closed = rawExchange(t, addr, "POST /orders HTTP/1.1\r\nHost: x\r\nX-User-Id: "+user+
		"\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nd\r\n{\"amount\": 7}\r\n0\r\n\r\n", 10*time.Second)
	if status != http.StatusCreated || !strings.Contains(strings.ToLower(header), "connection: close") || !closed {
		t.Errorf("CL and TE: %d, closed %v\n%s\n%s", status, closed, header, body)
	}
}

// rawExchange writes req on a new connection, reads one response, and tells
// whether the server then closed the connection (within wait).
func rawExchange(t *testing.T, addr, req string, wait time.Duration) (status int, header, body string, closed bool) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(wait))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	var h strings.Builder
	resp.Header.Write(&h)
	if resp.Close {
		h.WriteString("Connection: close\r\n") // ReadResponse takes it out of Header
	}
	_, err = br.ReadByte()
	return resp.StatusCode, h.String(), string(b), err == io.EOF
}

// Event streams are capped in all (503) and per user (429), with Retry-After
// and the connection closed, and end at their lifetime.
func TestEventStreamsAreBounded(t *testing.T) {
	_, _, s := startStackWith(t, map[string]string{
		"STREAMS_MAX":         "4",
		"STREAMS_PER_USER":    "2",
		"STREAM_MAX_LIFETIME": "2s",
	})
	users := []string{newUser(), newUser(), newUser()}
	o := s.createOrder(t, users[0], 5)
	streamOf := func(user string) (*http.Response, <-chan sseEvent) {
		id := o.ID
		if user != users[0] {
			id = s.createOrder(t, user, 5).ID
		}
		return stream(t, s.url, user, id)
	}
	open := func(user string) func() {
		resp, events := streamOf(user)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("stream for %s: %d", user, resp.StatusCode)
		}
		nextEvent(t, events, 5*time.Second)
		return func() { resp.Body.Close() }
	}
	refused := func(user string, want int) {
		t.Helper()
		req, _ := http.NewRequest("GET", s.url+"/orders/"+s.createOrder(t, user, 5).ID+"/events", nil)
		req.Header.Set("X-User-Id", user)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want || resp.Header.Get("Retry-After") == "" || resp.Header.Get("Content-Type") != "application/problem+json" || !resp.Close {
			t.Errorf("stream past a cap: %d, Retry-After %q, %s, close %v; want %d problem+json with Retry-After, closed",
				resp.StatusCode, resp.Header.Get("Retry-After"), resp.Header.Get("Content-Type"), resp.Close, want)
		}
	}
	closeA := open(users[0])
	open(users[0])
	refused(users[0], http.StatusTooManyRequests) // the user's cap
	open(users[1])
	open(users[1])
	refused(users[2], http.StatusServiceUnavailable) // the service's cap
	if got := metric(t, s.url, "http_streams_open"); got != 4 {
		t.Errorf("http_streams_open %v, want 4", got)
	}
	if u, a := metric(t, s.url, `http_streams_refused_total{cap="user"}`), metric(t, s.url, `http_streams_refused_total{cap="all"}`); u != 1 || a != 1 {
		t.Errorf("refused: user %v, all %v; want 1 and 1", u, a)
	}
	closeA()
	waitFor(t, 5*time.Second, "a closed stream's place taken by another user", func() bool {
		return metric(t, s.url, "http_streams_open") == 3
	})
	open(users[2])()

	// Every stream ends by its lifetime: all places are free again.
	waitFor(t, 5*time.Second, "streams ended by their lifetime", func() bool {
		return metric(t, s.url, "http_streams_open") == 0
	})
}

// A finished order's stream gives its final event, then 204 to an EventSource
// that reconnects with it, so that a browser stops reconnecting.
func TestFinishedOrderStreamEndsAnEventSource(t *testing.T) {
	b, _, s := startStack(t)
	user := newUser()
	o := s.createOrder(t, user, 5)
	produce(t, b, b.topic(topicPaymentResults), o.ID, `{"order_id": "`+o.ID+`", "status": "PAID"}`)
	waitFor(t, 10*time.Second, "PAID", func() bool { return s.getOrder(t, user, o.ID).Status == "PAID" })

	// The first request learns the state: 200, the final event, its id.
	r := do(t, "GET", s.url+"/orders/"+o.ID+"/events", "", "X-User-Id", user)
	if r.status != http.StatusOK || !strings.Contains(string(r.body), "id: PAID\nevent: status\n") {
		t.Errorf("a finished order's stream: %d %q, want 200 with its final event", r.status, r.body)
	}
	// An EventSource reconnecting after it: 204, which stops it.
	r = do(t, "GET", s.url+"/orders/"+o.ID+"/events", "", "X-User-Id", user, "Last-Event-ID", "PAID")
	if r.status != http.StatusNoContent || len(r.body) != 0 {
		t.Errorf("reconnect with Last-Event-ID PAID: %d %q, want 204", r.status, r.body)
	}
	// One that saw only PENDING gets the change it missed.
	r = do(t, "GET", s.url+"/orders/"+o.ID+"/events", "", "X-User-Id", user, "Last-Event-ID", "PENDING")
	if r.status != http.StatusOK || !strings.Contains(string(r.body), "id: PAID\n") {
		t.Errorf("reconnect with Last-Event-ID PENDING: %d %q, want 200 with PAID", r.status, r.body)
	}
}

// A client that stops reading is dropped when a write to it stalls: the
// stream's writer, served by net/http to a client that never reads.
func TestStalledStreamReaderIsDropped(t *testing.T) {
	old := streamWriteTimeout
	streamWriteTimeout = 300 * time.Millisecond
	t.Cleanup(func() { streamWriteTimeout = old })
	ended := make(chan int, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s := &eventStream{w: w, rc: http.NewResponseController(w)}
		chunk := strings.Repeat("x", 64<<10)
		sent := 0
		for sent < 1<<30 && s.send("data: %s\n\n", chunk) {
			sent += len(chunk)
		}
		ended <- sent
	}))
	defer srv.Close()
	c, err := net.Dial("tcp", strings.TrimPrefix(srv.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n") // and never read
	select {
	case sent := <-ended:
		if sent >= 1<<30 {
			t.Errorf("wrote %d bytes to a client that reads nothing", sent)
		}
		t.Logf("the writer gave up after %d MiB buffered", sent>>20)
	case <-time.After(30 * time.Second):
		t.Fatal("the writer still blocks on a client that reads nothing")
	}
}

// A status change wakes the streams of its order only, and a reconnect of
// the LISTEN connection wakes only the streams whose order changed meanwhile.
func TestNotifierWakesOnlyWhatChanged(t *testing.T) {
	_, _, db := schemaWithTables(t)
	n := newNotifier(db, slog.New(slog.DiscardHandler), func(ctx context.Context, _ string, ids []string) ([]string, error) {
		return ordersNotPending(ctx, db, ids)
	}, statusChannel)
	paid, pending := newUUID(), newUUID()
	for _, o := range []struct{ id, status string }{{paid, "PAID"}, {pending, "PENDING"}} {
		if _, err := db.Exec(context.Background(), `INSERT INTO orders (id, user_id, amount, status) VALUES ($1, 'u', 1, $2)`, o.id, o.status); err != nil {
			t.Fatal(err)
		}
	}
	subs := map[string]<-chan struct{}{}
	for _, id := range []string{paid, pending} {
		c, cancel := n.subscribe(statusChannel, id)
		t.Cleanup(cancel)
		subs[id] = c
	}
	relay, cancel := n.subscribe(statusChannel, "")
	t.Cleanup(cancel)
	fired := func(c <-chan struct{}) bool {
		select {
		case <-c:
			return true
		default:
			return false
		}
	}

	n.signal(statusChannel, pending)
	if !fired(subs[pending]) || fired(subs[paid]) || !fired(relay) {
		t.Error("a change of one order: want its stream and the any-payload subscriber woken, no other")
	}
	n.resyncAll(context.Background())
	if !fired(subs[paid]) || fired(subs[pending]) || !fired(relay) {
		t.Error("after a reconnect: want the stream of the order that changed woken, not the one still PENDING")
	}
}

// With streams at their cap and twice as many clients that never read
// knocking, the API still answers: connections take all the process's file
// descriptors but a reserve, and streams at most half of those, whatever
// RLIMIT_NOFILE it is given.
func TestStreamCapKeepsTheAPIAnswering(t *testing.T) {
	b := newBroker(t, true)
	dbURL := newSchema(t)
	env := childEnvFor(dbURL, b)
	env["STREAMS_PER_USER"] = "10000"
	env[rlimitEnv] = "256"
	c := startChild(t, env)
	c.waitReady(t)
	cap := int(metric(t, c.url, "http_streams_max"))
	if conns := metric(t, c.url, "http_connections_max"); cap != 96 || conns != 256-fdReserve {
		t.Fatalf("http_streams_max %d, http_connections_max %v with 256 descriptors; want 96 and %d", cap, conns, 256-fdReserve)
	}
	user := newUser()
	r := do(t, "POST", c.url+"/orders", `{"amount": 5}`, "X-User-Id", user)
	if r.status != http.StatusCreated {
		t.Fatalf("POST: %d %s", r.status, r.body)
	}
	id := r.order(t).ID
	addr := strings.TrimPrefix(c.url, "http://")
	req := "GET /orders/" + id + "/events HTTP/1.1\r\nHost: x\r\nX-User-Id: " + user + "\r\n\r\n"
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	var wg sync.WaitGroup
	for range 3 * cap { // the cap, then twice as many refused
		wg.Go(func() {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				return
			}
			io.WriteString(c, req) // and never read
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		})
	}
	wg.Wait()
	waitFor(t, 20*time.Second, "the streams at their cap, the rest refused", func() bool {
		open, refused := metric(t, c.url, "http_streams_open"), metric(t, c.url, `http_streams_refused_total{cap="all"}`)
		t.Logf("streams open %v, refused %v", open, refused)
		return open == float64(cap) && refused == float64(2*cap)
	})
	for i := range 20 {
		if r := do(t, "POST", c.url+"/orders", `{"amount": 5}`, "X-User-Id", user); r.status != http.StatusCreated {
			t.Errorf("POST %d with the streams at their cap: %d %s", i, r.status, r.body)
		}
		if r := do(t, "GET", c.url+"/healthz", ""); r.status != http.StatusOK {
			t.Errorf("/healthz %d with the streams at their cap: %d", i, r.status)
		}
	}
	if open, max := metric(t, c.url, "process_open_fds"), metric(t, c.url, "process_max_fds"); max != 256 || open >= max-32 {
		t.Errorf("%v of %v descriptors open with the streams at their cap", open, max)
	}
	if strings.Contains(c.out.String()+c.stderr.String(), "too many open files") {
		t.Error("the service ran out of file descriptors")
	}
}

// rlimitEnv sets the child's RLIMIT_NOFILE (soft and hard) before it starts.
const rlimitEnv = "ORDER_SERVICE_TEST_NOFILE"

func setTestRlimit() {
	v := os.Getenv(rlimitEnv)
	if v == "" {
		return
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err == nil {
		err = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: n, Max: n})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "set RLIMIT_NOFILE:", err)
		os.Exit(2)
	}
}

// The stream is served by replica A, whose consumer reads another topic; the
// result is applied by replica B. Only LISTEN/NOTIFY through PostgreSQL can
// carry the change from B to A.
func TestOrderEventsStreamAChangeAppliedByAnotherReplica(t *testing.T) {
	dbURL := newSchema(t)
	bA, bB := newBroker(t, false), newBroker(t, false)
	a := startService(t, serviceEnv(dbURL, bA))
	bsvc := startService(t, serviceEnv(dbURL, bB))
	user := newUser()
	o := bsvc.createOrder(t, user, 10)

	resp, events := stream(t, a.url, user, o.ID)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("status %d, Content-Type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	first, _ := nextEvent(t, events, 5*time.Second)
	if first.ID != o.ID || first.Status != "PENDING" {
		t.Fatalf("first event %+v, want the PENDING order at once", first)
	}
	produce(t, bB, bB.topic(topicPaymentResults), o.ID, `{"order_id": "`+o.ID+`", "status": "FAILED", "reason": "card declined"}`)
	second, _ := nextEvent(t, events, 10*time.Second)
	if second.Status != "FAILED" || second.FailureReason == nil || *second.FailureReason != "card declined" {
		t.Fatalf("second event %+v", second)
	}
	if _, open := nextEvent(t, events, 5*time.Second); open {
		t.Error("the stream went on after a terminal status")
	}
	if got := metric(t, a.url, `payment_results_applied_total{status="FAILED"}`); got != 0 {
		t.Errorf("replica A applied the result itself (%v); the test proves nothing", got)
	}

	// A terminal order: one event, then the end.
	_, events = stream(t, a.url, user, o.ID)
	if ev, _ := nextEvent(t, events, 5*time.Second); ev.Status != "FAILED" {
		t.Errorf("terminal order streamed %+v", ev)
	}
	if _, open := nextEvent(t, events, 5*time.Second); open {
		t.Error("a terminal order's stream did not end")
	}
}

// An order's event stream is its user's own: another user's, or an unknown
// order, is 404 problem+json, a malformed id 400, no user 401; and shutdown
// ends an open stream within 5 s instead of waiting for it.
func TestOrderEventsIsolationAndErrors(t *testing.T) {
	_, _, s := startStack(t)
	alice := newUser()
	o := s.createOrder(t, alice, 10)
	for _, c := range []struct {
		user, id string
		status   int
	}{
		{newUser(), o.ID, 404},
		{alice, "01890000-0000-7000-8000-000000000000", 404},
		{alice, "nope", 400},
		{"", o.ID, 401},
	} {
		r := do(t, "GET", s.url+"/orders/"+c.id+"/events", "", "X-User-Id", c.user)
		if r.status != c.status || r.header.Get("Content-Type") != "application/problem+json" {
			t.Errorf("events of %s as %q: %d %s, want %d", c.id, c.user, r.status, r.body, c.status)
		}
	}

	// Shutdown ends open streams instead of waiting for them.
	_, events := stream(t, s.url, alice, o.ID)
	nextEvent(t, events, 5*time.Second)
	start := time.Now()
	if err := s.stop(t); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("shutdown with an open stream took %s", d)
	}
	if _, open := nextEvent(t, events, 5*time.Second); open {
		t.Error("stream still open after shutdown")
	}
}

// Hostile HTTP gets a clear answer and changes nothing it should not:
// oversized headers 431, a slow client cut off by the header timeout, SQL
// meta-characters stored verbatim, a bad cursor 400, unknown routes and
// methods problem+json, another user's order never visible.
func TestHostileHTTP(t *testing.T) {
	_, dbURL, s := startStack(t)

	t.Run("huge header is 431", func(t *testing.T) {
		r := do(t, "GET", s.url+"/orders", "", "X-User-Id", "u", "X-Padding", strings.Repeat("p", 100<<10))
		if r.status != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("status %d", r.status)
		}
	})

	t.Run("slow client is cut off by the header timeout", func(t *testing.T) {
		conn, err := net.Dial("tcp", strings.TrimPrefix(s.url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprint(conn, "POST /orders HTTP/1.1\r\nHost: x\r\nX-User-Id: slow\r\n") // and never the rest
		start := time.Now()
		conn.SetReadDeadline(time.Now().Add(15 * time.Second))
		_, err = io.ReadAll(conn)
		if d := time.Since(start); err != nil || d > 8*time.Second {
			t.Errorf("connection still open after %s (err %v); want it closed after the 5s header timeout", d, err)
		}
	})

	t.Run("SQL meta-characters are stored verbatim", func(t *testing.T) {
		user := `O'Brien"; DROP TABLE orders; --`
		desc := `'); DELETE FROM outbox; -- %_\ $1 ::text` + "\t\u00a0😀"
		body := fmt.Sprintf(`{"amount": 5, "description": %q}`, desc)
		r := do(t, "POST", s.url+"/orders", body, "X-User-Id", user)
		if r.status != http.StatusCreated {
			t.Fatalf("%d %s", r.status, r.body)
		}
		o := r.order(t)
		got := s.getOrder(t, user, o.ID)
		if got.UserID != user || got.Description != desc {
			t.Errorf("read back %q %q", got.UserID, got.Description)
		}
		if n := count(t, dbURL, `SELECT count(*) FROM orders WHERE user_id = $1 AND description = $2`, user, desc); n != 1 {
			t.Errorf("stored row does not match byte for byte")
		}
	})

	t.Run("a cursor outside its documented format is 400; any inside it is a page", func(t *testing.T) {
		id := newUUID()
		for _, cursor := range []string{
			"9223372036854775807." + id, // beyond PostgreSQL's timestamps (22008)
			"253402300800000000." + id,  // year 10000
			"-1." + id, "+1." + id, " 1." + id, "1." + strings.ToUpper(id), "1." + id + ".", "." + id, "1.",
			base64.RawURLEncoding.EncodeToString([]byte("1." + id)), // the format before
		} {
			r := do(t, "GET", s.url+"/orders?cursor="+url.QueryEscape(cursor), "", "X-User-Id", "u")
			if r.status != http.StatusBadRequest || r.header.Get("Content-Type") != "application/problem+json" {
				t.Errorf("cursor %q: %d %s", cursor, r.status, r.body)
			}
		}
		for _, cursor := range []string{"0." + id, "99999999999999999." + id, "00000000000000001." + id} {
			r := do(t, "GET", s.url+"/orders?cursor="+url.QueryEscape(cursor), "", "X-User-Id", "u")
			if r.status != http.StatusOK {
				t.Errorf("cursor %q: %d %s, want 200", cursor, r.status, r.body)
			}
		}
	})

	t.Run("unknown routes and wrong methods are problem+json", func(t *testing.T) {
		r := do(t, "GET", s.url+"/nowhere", "", "X-User-Id", "u")
		var p problem
		r.json(t, &p)
		if r.status != http.StatusNotFound || r.header.Get("Content-Type") != "application/problem+json" || p.Status != 404 || p.Detail == "" {
			t.Errorf("unknown route: %d %s %s", r.status, r.header.Get("Content-Type"), r.body)
		}
		r = do(t, "DELETE", s.url+"/orders", "", "X-User-Id", "u")
		r.json(t, &p)
		if r.status != http.StatusMethodNotAllowed || r.header.Get("Content-Type") != "application/problem+json" ||
			p.Status != 405 || !strings.Contains(r.header.Get("Allow"), "POST") || !strings.Contains(p.Detail, "GET") {
			t.Errorf("wrong method: %d %v %s", r.status, r.header, r.body)
		}
	})

	t.Run("another user's order is never visible", func(t *testing.T) {
		alice := newUser()
		o := s.createOrder(t, alice, 77)
		do(t, "POST", s.url+"/orders", `{"amount": 78}`, "X-User-Id", alice, "Idempotency-Key", "shared")
		for _, other := range []string{newUser(), strings.ToUpper(alice), alice + "x", "x" + alice, alice[:len(alice)-1]} {
			if r := do(t, "GET", s.url+"/orders/"+o.ID, "", "X-User-Id", other); r.status != http.StatusNotFound {
				t.Errorf("GET as %q: %d %s", other, r.status, r.body)
			}
			r := do(t, "GET", s.url+"/orders?limit=500", "", "X-User-Id", other)
			if strings.Contains(string(r.body), o.ID) {
				t.Errorf("list as %q shows alice's order", other)
			}
			r = do(t, "POST", s.url+"/orders", `{"amount": 78}`, "X-User-Id", other, "Idempotency-Key", "shared")
			if r.status != http.StatusCreated || r.order(t).UserID != other {
				t.Errorf("idempotency key of another user: %d %s", r.status, r.body)
			}
		}
	})
}
