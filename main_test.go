package main

// main_test.go: an order is written with its event, answered as it was
// written (201, a replay, 409, 503), whatever happens to its COMMIT; and the
// program starts as the README says.
//
// The tests start the real program (run) against a real PostgreSQL database,
// created for this test run and dropped after it, and a real Kafka-protocol
// broker: an in-process kfake cluster, or the cluster in KAFKA_BROKERS. They
// assert on HTTP answers, rows and Kafka records.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"
)

// --- the API ---

// An order and its pay-order event commit together, and the event is published
// with the order id as key, an event-id header and the contract's fields.
func TestCreateOrderWritesOrderAndOutboxAndPublishes(t *testing.T) {
	b, dbURL, s := startStack(t)
	user := newUser()

	r := do(t, "POST", s.url+"/orders", `{"amount": 4200, "description": "книга; DROP TABLE orders; --'\""}`,
		"X-User-Id", user, "Content-Type", "application/json")
	if r.status != http.StatusCreated {
		t.Fatalf("status %d %s", r.status, r.body)
	}
	o := r.order(t)
	if r.header.Get("Location") != "/orders/"+o.ID || !isUUID(o.ID) {
		t.Errorf("Location %q for id %q", r.header.Get("Location"), o.ID)
	}
	if o.UserID != user || o.Amount != 4200 || o.Status != "PENDING" || o.Description != `книга; DROP TABLE orders; --'"` {
		t.Errorf("order %+v", o)
	}
	if o.CreatedAt.IsZero() || !o.CreatedAt.Equal(o.UpdatedAt) {
		t.Errorf("times %v %v", o.CreatedAt, o.UpdatedAt)
	}
	var raw map[string]any
	r.json(t, &raw)
	for _, f := range []string{"id", "user_id", "amount", "description", "status", "created_at", "updated_at"} {
		if _, ok := raw[f]; !ok {
			t.Errorf("order JSON lacks %q: %s", f, r.body)
		}
	}
	if _, err := time.Parse(time.RFC3339, raw["created_at"].(string)); err != nil {
		t.Errorf("created_at is not RFC 3339: %v", err)
	}

	recs := readPayOrders(t, b, []string{o.ID}, 10*time.Second)
	if len(recs) != 1 {
		t.Fatalf("want 1 pay-order record, got %d", len(recs))
	}
	p := recs[0]
	if p.key != o.ID || p.OrderID != o.ID || p.UserID != user || p.Amount != 4200 || !p.CreatedAt.Equal(o.CreatedAt) {
		t.Errorf("pay-order record %+v for order %+v", p, o)
	}
	if !isUUID(p.EventID) || p.header != p.EventID {
		t.Errorf("event_id %q, event-id header %q", p.EventID, p.header)
	}
	// The outbox is a queue: the published event's row is gone.
	waitFor(t, 5*time.Second, "the published event's outbox row deleted", func() bool {
		return count(t, dbURL, `SELECT count(*) FROM outbox`) == 0
	})
}

// Bad input gets a problem+json 4xx that says what is wrong, and writes no
// order and no event.
func TestCreateOrderRejectsBadInputAndWritesNothing(t *testing.T) {
	_, dbURL, s := startStack(t)
	user := newUser()

	long := strings.Repeat("я", 1001)
	cases := []struct {
		name    string
		body    string
		headers []string
		status  int
	}{
		{"no user", `{"amount": 1}`, nil, 401},
		{"empty user", `{"amount": 1}`, []string{"X-User-Id", ""}, 401},
		{"user too long", `{"amount": 1}`, []string{"X-User-Id", strings.Repeat("u", 129)}, 400},
		{"user not printable", `{"amount": 1}`, []string{"X-User-Id", "a\tb"}, 400},
		{"malformed JSON", `{"amount": `, nil, 400},
		{"not an object", `[1]`, nil, 400},
		{"empty body", ``, nil, 400},
		{"unknown field", `{"amount": 1, "currency": "RUB"}`, nil, 400},
		{"amount a string", `{"amount": "100"}`, nil, 400},
		{"amount a fraction", `{"amount": 1.5}`, nil, 400},
		{"amount zero", `{"amount": 0}`, nil, 400},
		{"amount negative", `{"amount": -5}`, nil, 400},
		{"amount over int64", `{"amount": 9223372036854775808}`, nil, 400},
		{"amount over int64, exponent", `{"amount": 1e19}`, nil, 400},
		{"amount a fraction, exponent", `{"amount": 15e-1}`, nil, 400},
		{"amount a tiny fraction", `{"amount": 1.0000000000000000000000001}`, nil, 400},
		{"amount a huge exponent", `{"amount": 1e999999999999}`, nil, 400},
		{"amount zero, exponent", `{"amount": 0e5}`, nil, 400},
		{"amount a bool", `{"amount": true}`, nil, 400},
		{"amount an object", `{"amount": {}}`, nil, 400},
		{"amount missing", `{"description": "x"}`, nil, 400},
		{"amount null", `{"amount": null}`, nil, 400},
		{"description too long", `{"amount": 1, "description": "` + long + `"}`, nil, 400},
		{"description not a string", `{"amount": 1, "description": 7}`, nil, 400},
		{"invalid UTF-8", "{\"amount\": 1, \"description\": \"\xff\"}", nil, 400},
		{"NUL in description", `{"amount": 1, "description": "a\u0000b"}`, nil, 400},
		{"trailing data", `{"amount": 1} {"amount": 2}`, nil, 400},
		{"idempotency key too long", `{"amount": 1}`, []string{"Idempotency-Key", strings.Repeat("k", 256)}, 400},
		{"body over 1 MiB", `{"amount": 1, "description": "` + strings.Repeat(" ", 1<<20) + `"}`, nil, 413},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := c.headers
			if c.name != "no user" && c.name != "empty user" && !strings.HasPrefix(c.name, "user ") {
				h = append([]string{"X-User-Id", user}, h...)
			}
			r := do(t, "POST", s.url+"/orders", c.body, h...)
			if r.status != c.status {
				t.Fatalf("status %d, want %d: %s", r.status, c.status, r.body)
			}
			if ct := r.header.Get("Content-Type"); ct != "application/problem+json" {
				t.Errorf("Content-Type %q", ct)
			}
			var p problem
			r.json(t, &p)
			if p.Status != c.status || p.Title != http.StatusText(c.status) || p.Type == "" || p.Detail == "" {
				t.Errorf("problem %+v", p)
			}
		})
	}
	if n := count(t, dbURL, `SELECT count(*) FROM orders`); n != 0 {
		t.Errorf("bad requests wrote %d orders", n)
	}
	if n := count(t, dbURL, `SELECT count(*) FROM outbox`); n != 0 {
		t.Errorf("bad requests wrote %d outbox rows", n)
	}

	// A whole number is an integer however it is written (JSON Schema's
	// reading, and what a generated client may send).
	for body, want := range map[string]int64{
		`{"amount": 1500.0}`: 1500, `{"amount": 1.5e3}`: 1500, `{"amount": 15E2}`: 1500,
		`{"amount": 150000e-2}`: 1500, `{"amount": 9.223372036854775807e18}`: 1<<63 - 1,
	} {
		r := do(t, "POST", s.url+"/orders", body, "X-User-Id", user)
		if r.status != http.StatusCreated || r.order(t).Amount != want {
			t.Errorf("%s: %d %s, want 201 with amount %d", body, r.status, r.body, want)
		}
	}

	// The limits themselves are accepted.
	r := do(t, "POST", s.url+"/orders", `{"amount": 9223372036854775807, "description": "`+long[:len(long)-2]+`"}`,
		"X-User-Id", strings.Repeat("u", 128))
	if r.status != http.StatusCreated {
		t.Fatalf("largest valid order: %d %s", r.status, r.body)
	}
}

// An Idempotency-Key replay returns the same order and emits no second event,
// even when the replays are concurrent; the same key with another body is 409.
func TestIdempotencyKey(t *testing.T) {
	b, dbURL, s := startStack(t)
	alice, bob := newUser(), newUser()

	first := do(t, "POST", s.url+"/orders", `{"amount": 700, "description": "once"}`, "X-User-Id", alice, "Idempotency-Key", "k-1")
	if first.status != http.StatusCreated {
		t.Fatalf("first: %d %s", first.status, first.body)
	}
	again := do(t, "POST", s.url+"/orders", `{"amount": 700, "description": "once"}`, "X-User-Id", alice, "Idempotency-Key", "k-1")
	if again.status != http.StatusOK || again.order(t).ID != first.order(t).ID {
		t.Fatalf("replay: %d %s, want 200 with %s", again.status, again.body, first.order(t).ID)
	}
	conflict := do(t, "POST", s.url+"/orders", `{"amount": 701, "description": "once"}`, "X-User-Id", alice, "Idempotency-Key", "k-1")
	if conflict.status != http.StatusConflict || conflict.header.Get("Content-Type") != "application/problem+json" {
		t.Fatalf("different body: %d %s, want 409", conflict.status, conflict.body)
	}
	other := do(t, "POST", s.url+"/orders", `{"amount": 700, "description": "once"}`, "X-User-Id", bob, "Idempotency-Key", "k-1")
	if other.status != http.StatusCreated || other.order(t).ID == first.order(t).ID {
		t.Fatalf("same key, other user: %d %s, want a new order", other.status, other.body)
	}

	// Concurrent replays: exactly one creates, the rest get its order.
	const n = 20
	var created, replayed atomic.Int32
	ids := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			r := do(t, "POST", s.url+"/orders", `{"amount": 5}`, "X-User-Id", alice, "Idempotency-Key", "race")
			switch r.status {
			case http.StatusCreated:
				created.Add(1)
			case http.StatusOK:
				replayed.Add(1)
			default:
				t.Errorf("concurrent replay: %d %s", r.status, r.body)
				return
			}
			ids[i] = r.order(t).ID
		})
	}
	wg.Wait()
	if created.Load() != 1 || replayed.Load() != n-1 {
		t.Errorf("concurrent: %d created, %d replayed", created.Load(), replayed.Load())
	}
	for _, id := range ids {
		if id != ids[0] {
			t.Errorf("concurrent replays returned different orders: %v", ids)
			break
		}
	}
	if c := count(t, dbURL, `SELECT count(*) FROM orders`); c != 3 {
		t.Errorf("orders: %d, want 3", c)
	}
	waitDrained(t, dbURL) // the outbox is empty once every event is published
	if n := endOffsets(t, b, b.topic(topicPayOrder)); n != 3 {
		t.Errorf("pay-order holds %d events, want 3 (no event for a replay)", n)
	}
}

// Paging through a user's orders visits each exactly once, newest first,
// however the pages fall.
func TestListOrdersPagesEveryOrderOnceNewestFirst(t *testing.T) {
	_, dbURL, s := startStack(t)
	alice, bob := newUser(), newUser()

	var want []string
	for i := range 23 {
		want = append(want, s.createOrder(t, alice, int64(100+i)).ID)
	}
	s.createOrder(t, bob, 1)
	// Orders created in one transaction share created_at: make some ties
	// so paging has to order by id as well.
	if _, err := schemaPool(t, dbURL).Exec(context.Background(),
		`UPDATE orders SET created_at = (SELECT min(created_at) FROM orders) WHERE amount BETWEEN 105 AND 112`); err != nil {
		t.Fatal(err)
	}

	var got []Order
	cursor := ""
	pages := 0
	for {
		u := s.url + "/orders?limit=5"
		if cursor != "" {
			u += "&cursor=" + url.QueryEscape(cursor)
		}
		r := do(t, "GET", u, "", "X-User-Id", alice)
		if r.status != http.StatusOK {
			t.Fatalf("GET %s: %d %s", u, r.status, r.body)
		}
		var page struct {
			Orders     []Order `json:"orders"`
			NextCursor *string `json:"next_cursor"`
		}
		r.json(t, &page)
		pages++
		got = append(got, page.Orders...)
		if page.NextCursor == nil {
			break
		}
		if len(page.Orders) != 5 {
			t.Fatalf("page %d has %d orders and a next_cursor", pages, len(page.Orders))
		}
		cursor = *page.NextCursor
	}
	if pages != 5 || len(got) != 23 {
		t.Fatalf("%d pages, %d orders; want 5 pages, 23 orders", pages, len(got))
	}
	seen := map[string]bool{}
	for i, o := range got {
		if o.UserID != alice {
			t.Errorf("another user's order in alice's list: %+v", o)
		}
		if seen[o.ID] {
			t.Errorf("order %s listed twice", o.ID)
		}
		seen[o.ID] = true
		if i > 0 {
			prev := got[i-1]
			if o.CreatedAt.After(prev.CreatedAt) || o.CreatedAt.Equal(prev.CreatedAt) && o.ID > prev.ID {
				t.Errorf("not newest first at %d: %v/%s after %v/%s", i, o.CreatedAt, o.ID, prev.CreatedAt, prev.ID)
			}
		}
	}
	for _, id := range want {
		if !seen[id] {
			t.Errorf("order %s never listed", id)
		}
	}

	r := do(t, "GET", s.url+"/orders", "", "X-User-Id", alice)
	var all orderPage
	r.json(t, &all)
	if len(all.Orders) != 23 || all.NextCursor != "" || bytes.Contains(r.body, []byte("next_cursor")) {
		t.Errorf("default page: %d orders, next_cursor %q", len(all.Orders), all.NextCursor)
	}

	for _, q := range []string{"limit=0", "limit=501", "limit=x", "limit=", "cursor=%%%", "cursor=bm9wZQ", "cursor="} {
		r := do(t, "GET", s.url+"/orders?"+q, "", "X-User-Id", alice)
		if r.status != http.StatusBadRequest || r.header.Get("Content-Type") != "application/problem+json" {
			t.Errorf("?%s: %d %s, want 400 problem", q, r.status, r.body)
		}
	}
	if r := do(t, "GET", s.url+"/orders", ""); r.status != http.StatusUnauthorized {
		t.Errorf("list without X-User-Id: %d", r.status)
	}
}

// Another user's order is never visible: 404, as for an order that does not
// exist.
func TestGetOrderIsolatesUsers(t *testing.T) {
	_, _, s := startStack(t)
	alice, bob := newUser(), newUser()
	o := s.createOrder(t, alice, 99)

	if got := s.getOrder(t, alice, o.ID); got.ID != o.ID || got.Amount != 99 {
		t.Errorf("own order: %+v", got)
	}
	if got := s.getOrder(t, alice, strings.ToUpper(o.ID)); got.ID != o.ID {
		t.Errorf("upper-case id: %+v", got)
	}
	for _, c := range []struct {
		user, id string
		status   int
	}{
		{bob, o.ID, 404},
		{alice, "01890000-0000-7000-8000-000000000000", 404},
		{alice, "not-a-uuid", 400},
		{alice, "' OR 1=1 --", 400},
		{"", o.ID, 401},
	} {
		r := do(t, "GET", s.url+"/orders/"+url.PathEscape(c.id), "", "X-User-Id", c.user)
		if r.status != c.status || r.header.Get("Content-Type") != "application/problem+json" {
			t.Errorf("GET %s as %q: %d %s, want %d problem", c.id, c.user, r.status, r.body, c.status)
		}
		if bytes.Contains(r.body, []byte(alice)) {
			t.Errorf("answer leaks the owner: %s", r.body)
		}
	}
	r := do(t, "GET", s.url+"/orders", "", "X-User-Id", bob)
	var page orderPage
	r.json(t, &page)
	if len(page.Orders) != 0 {
		t.Errorf("bob lists alice's orders: %s", r.body)
	}
}

// --- payment results ---

// --- faults ---

// /healthz answers 200 while the process lives; /readyz answers 200 naming the
// database and Kafka ok when both are.
func TestReadyzAndHealthz(t *testing.T) {
	_, _, s := startStack(t)
	if r := do(t, "GET", s.url+"/healthz", ""); r.status != 200 {
		t.Errorf("healthz %d", r.status)
	}
	r := do(t, "GET", s.url+"/readyz", "")
	if r.status != 200 || !strings.Contains(string(r.body), `"kafka":"ok"`) || !strings.Contains(string(r.body), `"database":"ok"`) {
		t.Errorf("readyz %d %s", r.status, r.body)
	}
}

// A malformed variable stops the start with an error naming it; nothing set is
// a configuration that works for go run . (loopback, embedded broker, demo
// payments).
func TestConfigRejectsBadValues(t *testing.T) {
	for _, env := range []map[string]string{
		{"RELAY_BATCH_SIZE": "0"},
		{"RELAY_POLL_INTERVAL": "soon"},
		{"DEMO_PAYMENTS": "maybe"},
		{"LOG_LEVEL": "loud"},
		{"LOG_FORMAT": "xml"},
	} {
		_, err := loadConfig(func(k string) string { return env[k] })
		if err == nil {
			t.Errorf("%v accepted", env)
		}
	}
	c, err := loadConfig(func(string) string { return "" })
	if err != nil || c.HTTPAddr != "127.0.0.1:8081" || !c.DemoPayments || c.EmbeddedKafkaAddr != "127.0.0.1:9092" || len(c.KafkaBrokers) != 0 {
		t.Errorf("defaults %+v %v", c, err)
	}
	c, _ = loadConfig(func(k string) string { return map[string]string{"KAFKA_BROKERS": "a:9092, b:9092"}[k] })
	if c.DemoPayments || len(c.KafkaBrokers) != 2 || c.KafkaBrokers[1] != "b:9092" {
		t.Errorf("with KAFKA_BROKERS: %+v", c)
	}
}

// TestGoRunWithEmbeddedBroker is the quick start: no KAFKA_BROKERS, so the
// embedded broker and the demo Payment Service run, and orders reach PAID or
// FAILED; a restart on the same data dir keeps every pay-order record.
func TestGoRunWithEmbeddedBroker(t *testing.T) {
	dbURL := newSchema(t)
	dir := t.TempDir()
	port := freePort()
	env := map[string]string{
		"HTTP_ADDR":           "127.0.0.1:0",
		"DATABASE_URL":        dbURL,
		"EMBEDDED_KAFKA_ADDR": "127.0.0.1:" + port,
		"EMBEDDED_KAFKA_DIR":  dir,
	}
	s := startService(t, env)
	user := newUser()
	small, large := s.createOrder(t, user, 1000), s.createOrder(t, user, demoPaymentLimit+1)
	waitFor(t, 15*time.Second, "demo payments answered", func() bool {
		return s.getOrder(t, user, small.ID).Status == "PAID" && s.getOrder(t, user, large.ID).Status == "FAILED"
	})
	if r := s.getOrder(t, user, large.ID).FailureReason; r == nil || !strings.Contains(*r, "limit") {
		t.Errorf("FAILED without a reason: %v", r)
	}
	if err := s.stop(t); err != nil {
		t.Fatalf("stop: %v", err)
	}

	s2 := startService(t, env)
	b := &broker{addrs: []string{"127.0.0.1:" + port}}
	recs := readPayOrders(t, b, []string{small.ID, large.ID}, 10*time.Second)
	if len(recs) != 2 {
		t.Errorf("after restart pay-order holds %d of our records, want 2", len(recs))
	}
	third := s2.createOrder(t, user, 5)
	waitFor(t, 15*time.Second, "a new order paid after restart", func() bool {
		return s2.getOrder(t, user, third.ID).Status == "PAID"
	})
}

// The demo Payment Service decides each pay-order event once, as the
// contract asks of a Payment Service (docs/api.md): a copy of an event that
// comes again, even one whose amount would now be refused, is answered with
// the decision stored the first time, and its inbox holds the event once.
func TestDemoPaymentServiceDecidesEachEventOnce(t *testing.T) {
	b, dbURL, s := startStackWith(t, map[string]string{
		"DEMO_PAYMENTS": "true",
	})
	user := newUser()
	o := s.createOrder(t, user, 1000)
	waitFor(t, 15*time.Second, "the demo paying the order", func() bool { return s.getOrder(t, user, o.ID).Status == "PAID" })
	ev := readPayOrders(t, b, []string{o.ID}, 10*time.Second)[0]
	again, err := json.Marshal(map[string]any{"event_id": ev.EventID, "order_id": ev.OrderID, "user_id": ev.UserID,
		"amount": demoPaymentLimit + 1, "created_at": ev.CreatedAt})
	if err != nil {
		t.Fatal(err)
	}
	produceRecords(t, b, &kgo.Record{Topic: b.topic(topicPayOrder), Key: []byte(o.ID), Value: again,
		Headers: []kgo.RecordHeader{{Key: "event-id", Value: []byte(ev.EventID)}}})
	var answers []string
	readTopic(t, b, b.topic(topicPaymentResults), 15*time.Second, func(recs []*kgo.Record) bool {
		answers = answers[:0]
		for _, r := range recs {
			if string(r.Key) == o.ID {
				answers = append(answers, string(r.Value))
			}
		}
		return len(answers) == 2
	})
	for _, a := range answers {
		var res paymentResult
		if err := json.Unmarshal([]byte(a), &res); err != nil || res.Status != "PAID" {
			t.Errorf("the demo answered %s, want PAID both times: the event was decided again", a)
		}
	}
	if n := count(t, dbURL, `SELECT count(*) FROM demo_payment_inbox WHERE event_id = $1`, ev.EventID); n != 1 {
		t.Errorf("the demo's inbox holds the event %d times, want 1", n)
	}
}

// childEnv makes the test binary run the service itself, as `go run .` would:
// the crash tests start it as a child process they can SIGKILL.
const childEnv = "ORDER_SERVICE_TEST_CHILD"

func childMain() {
	setTestRlimit()
	main()
}

// --- the relay ---

// --- live status (Server-Sent Events) ---

type sseEvent struct{ name, data string }

// --- shared commits ---

// A shared commit keeps each request's own outcome: new orders are created, a
// replay in the same batch gets the first order, a key reused with another
// body conflicts; only a commit that wrote outbox rows wakes the relay.
func TestSharedCommitKeepsPerRequestOutcomes(t *testing.T) {
	dbURL := newSchema(t)
	db := schemaPool(t, dbURL)
	if err := applySchema(context.Background(), db); err != nil {
		t.Fatal(err)
	}
	var announced atomic.Int32 // commits that wrote outbox rows
	w := newOrderWriter(db, "pay-order", 64, 512, newMetrics(), func() { announced.Add(1) })
	key := func(s string) *string { return &s }
	order := func(user string, amount int64, k *string) newOrder {
		return newOrder{ID: newUUID(), UserID: user, Amount: amount, IdempotencyKey: k, RequestHash: []byte{byte(amount)}}
	}

	// One batch: two new orders, a replay of a key used earlier in the same
	// batch, and a reuse of that key with another body.
	res := writeBatch(t, w,
		order("u1", 1, key("k")), order("u2", 2, nil), order("u1", 1, key("k")), order("u1", 3, key("k")))
	if !res[0].Created || res[0].Err != nil || !res[1].Created {
		t.Fatalf("new orders: %+v %+v", res[0], res[1])
	}
	if res[2].Created || res[2].Err != nil || res[2].Order.ID != res[0].Order.ID {
		t.Errorf("replay in the same batch: %+v, want order %s", res[2], res[0].Order.ID)
	}
	if !errors.Is(res[3].Err, errIdempotencyConflict) {
		t.Errorf("key reused with another body: %+v, want a conflict", res[3])
	}
	if n := count(t, dbURL, `SELECT count(*) FROM outbox`); n != 2 {
		t.Errorf("%d outbox rows, want 2", n)
	}
	if n := announced.Load(); n != 1 {
		t.Errorf("the batch's commit announced new outbox rows %d times, want 1", n)
	}
	// A batch of replays writes no event, and wakes no relay.
	before := announced.Load()
	if res := writeBatch(t, w, order("u1", 1, key("k"))); res[0].Created || res[0].Err != nil {
		t.Errorf("replay alone: %+v", res[0])
	}
	if n := announced.Load(); n != before {
		t.Errorf("a commit without new outbox rows announced them")
	}

	// One row the database rejects (amount 0 passes no CHECK) must not
	// fail the requests that share its batch.
	res = writeBatch(t, w, order("u3", 5, nil), order("u3", 0, nil), order("u3", 6, nil))
	if !res[0].Created || !res[2].Created || res[1].Err == nil || res[1].Created {
		t.Errorf("batch with one bad row: %+v", res)
	}
	if n := count(t, dbURL, `SELECT count(*) FROM orders WHERE user_id = 'u3'`); n != 2 {
		t.Errorf("%d orders for u3, want 2", n)
	}
}

// More orders than the writers can take: the queue holds CREATE_QUEUE_MAX and
// whatever arrives past it is refused at once, 503 with Retry-After, nothing
// stored; the queued ones are written once a writer is free. A queued request
// whose time runs too short while it waits is answered 503 before it joins a
// batch, rather than give the batch its deadline. The one writer is held by a
// lock the test owns: its request waits on the test's uncommitted row with the
// same Idempotency-Key.
func TestOverloadIsRefusedAtOnce(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	const queueMax = 4
	env := serviceEnv(dbURL, b)
	env["CREATE_WRITERS"], env["CREATE_BATCH_MAX"], env["CREATE_QUEUE_MAX"] = "1", "1", strconv.Itoa(queueMax)
	s := startService(t, env)
	user := newUser()
	hold := func(key string) pgx.Tx {
		tx, err := schemaPool(t, dbURL).Begin(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tx.Rollback(context.Background()) }) //nolint:errcheck // a no-op once released
		if _, err := tx.Exec(context.Background(), `INSERT INTO orders (id, user_id, amount, idempotency_key, request_hash)
			VALUES ($1, $2, 1, $3, '\x00')`, newUUID(), user, key); err != nil {
			t.Fatal(err)
		}
		return tx
	}
	// post sends n orders at once, after the one the writer is held on, and
	// returns their answers and how long each took.
	type answer struct {
		r    response
		took time.Duration
	}
	post := func(phase string, n int, release func()) (held response, answers []answer) {
		heldDone := make(chan response, 1)
		go func() {
			heldDone <- do(t, "POST", s.url+"/orders", `{"amount": 1}`, "X-User-Id", user, "Idempotency-Key", phase+"-held")
		}()
		waitFor(t, 5*time.Second, "the writer held on the lock", func() bool {
			return count(t, dbURL, `SELECT count(*) FROM pg_locks WHERE NOT granted`) > 0
		})
		var mu sync.Mutex
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				start := time.Now()
				r := do(t, "POST", s.url+"/orders", `{"amount": 2}`, "X-User-Id", user, "Idempotency-Key", fmt.Sprint(phase, i))
				mu.Lock()
				answers = append(answers, answer{r, time.Since(start)})
				mu.Unlock()
			})
			if i < queueMax { // the first ones take the queue's places, in order
				waitFor(t, 5*time.Second, "a request queued", func() bool { return metric(t, s.url, "order_queue_waiting") == float64(i+1) })
			}
		}
		released := make(chan struct{})
		go func() {
			defer close(released)
			release()
		}()
		wg.Wait()
		<-released
		return <-heldDone, answers
	}

	// Held 0.5 s: the queued orders are written, the rest refused at once.
	first := hold("first-held")
	held, answers := post("first", queueMax+6, func() { time.Sleep(500 * time.Millisecond); first.Rollback(context.Background()) }) //nolint:errcheck // the test's own row
	if held.status != http.StatusCreated {
		t.Errorf("the held request: %d %s", held.status, held.body)
	}
	var created, refused int
	for _, a := range answers {
		switch {
		case a.r.status == http.StatusCreated:
			created++
		case a.r.status == http.StatusServiceUnavailable && a.r.header.Get("Retry-After") != "" && a.took < 200*time.Millisecond:
			refused++
		default:
			t.Errorf("an order answered %d after %s: %s", a.r.status, a.took, a.r.body)
		}
	}
	if created != queueMax || refused != 6 {
		t.Errorf("%d created and %d refused at once, want %d and 6", created, refused, queueMax)
	}
	if got := metric(t, s.url, `orders_refused_total{reason="queue_full"}`); got != 6 {
		t.Errorf(`orders_refused_total{reason="queue_full"} %v, want 6`, got)
	}

	// Held 2.2 s: the queued requests have under minWriteTime left when the
	// writer is free, and are answered 503 without being written.
	second := hold("second-held")
	_, answers = post("second", queueMax, func() {
		time.Sleep(requestDBTimeout - minWriteTime + 200*time.Millisecond)
		second.Rollback(context.Background()) //nolint:errcheck // as above
	})
	for _, a := range answers {
		if a.r.status != http.StatusServiceUnavailable || a.r.header.Get("Retry-After") == "" || a.took > requestDBTimeout {
			t.Errorf("a request queued past its time: %d after %s, want 503 within %s: %s", a.r.status, a.took, requestDBTimeout, a.r.body)
		}
	}
	if got := metric(t, s.url, `orders_refused_total{reason="late"}`); got != queueMax {
		t.Errorf(`orders_refused_total{reason="late"} %v, want %d`, got, queueMax)
	}
	if n := count(t, dbURL, `SELECT count(*) FROM orders WHERE idempotency_key LIKE 'second_'`); n != 0 {
		t.Errorf("%d of the orders answered 503 were written", n)
	}
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
	b, dbURL, s := startStack(t)
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

// Two users may pick the same Idempotency-Key: each replay answers the
// caller's own order, never the other's.
func TestIdempotencyKeyIsScopedToItsUser(t *testing.T) {
	_, _, s := startStack(t)
	alice, bob := newUser(), newUser()
	const body = `{"amount": 5}`
	first := do(t, "POST", s.url+"/orders", body, "X-User-Id", alice, "Idempotency-Key", "k1")
	second := do(t, "POST", s.url+"/orders", body, "X-User-Id", bob, "Idempotency-Key", "k1")
	if first.status != http.StatusCreated || second.status != http.StatusCreated {
		t.Fatalf("first orders: %d, %d; want 201 each", first.status, second.status)
	}
	for _, c := range []struct {
		user string
		want Order
	}{{alice, first.order(t)}, {bob, second.order(t)}} {
		r := do(t, "POST", s.url+"/orders", body, "X-User-Id", c.user, "Idempotency-Key", "k1")
		if r.status != http.StatusOK || r.order(t).ID != c.want.ID {
			t.Errorf("%s's replay: %d %s, want 200 with %s", c.user, r.status, r.body, c.want.ID)
		}
	}
}

// Any body is either refused with a 400 or 413 problem that says why, or
// accepted as a valid order whose amount is exactly the number sent.
func FuzzDecodeOrderInput(f *testing.F) {
	for _, seed := range []string{
		`{"amount": 1500, "description": "Книга"}`, `{"amount": 1}`, `{"amount": 0}`, `{"amount": -5}`,
		`{"amount": 9223372036854775808}`, `{"amount": 1.5}`, `{"amount": "1"}`, `{"amount": 1, "extra": true}`,
		`{"amount": 1, "description": "a\u0000b"}`, "{\"amount\": 1, \"description\": \"\xff\"}", `{"amount": 1}{}`,
		`[]`, `null`, ``, strings.Repeat("[", 20000),
		`{"amount": 1, "amount": 2}`, `{"amount": 1, "description": null}`,
		`{"amount": 1500.0}`, `{"amount": 1.5e3}`, `{"amount": 15e-1}`, `{"amount": 1e999999999}`,
		`{"amount": 9.223372036854775807e18}`, `{"amount": 9.223372036854775808e18}`, `{"amount": -0.0}`,
		`{"Amount": 1}`, `{"amount": 1, "deſcription": "x"}`, `{"amount": 1, "description": "\ud800"}`,
		`{"amount": 1, "description": "\ud83d\ude00 \\ud800"}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		in, p := decodeOrderInput(http.MaxBytesReader(nil, io.NopCloser(bytes.NewReader(body)), maxBodyBytes))
		if p != nil {
			if p.Status != http.StatusBadRequest && p.Status != http.StatusRequestEntityTooLarge || p.Detail == "" {
				t.Fatalf("rejection %+v", p)
			}
			return
		}
		if in.Amount <= 0 || utf8.RuneCountInString(in.Description) > maxDescription ||
			!utf8.ValidString(in.Description) || strings.ContainsRune(in.Description, 0) {
			t.Fatalf("accepted an invalid order %+v from %q", in, body)
		}
		// The amount is the exact value of the number sent, however written.
		var raw struct{ Amount json.Number }
		dec := json.NewDecoder(bytes.NewReader(body))
		dec.UseNumber()
		if err := dec.Decode(&raw); err == nil && len(raw.Amount) < 64 {
			sent, ok := new(big.Rat).SetString(string(raw.Amount))
			if !ok || sent.Cmp(new(big.Rat).SetInt64(in.Amount)) != 0 {
				t.Fatalf("amount %s accepted as %d", raw.Amount, in.Amount)
			}
		}
		// What was accepted, sent again, is accepted as the same order.
		again, _ := json.Marshal(map[string]any{"amount": in.Amount, "description": in.Description})
		in2, p2 := decodeOrderInput(bytes.NewReader(again))
		if p2 != nil || in2 != in {
			t.Fatalf("round trip of %+v: %+v, %+v", in, in2, p2)
		}
	})
}
