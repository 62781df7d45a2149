package main

// outbox_test.go: the outbox's life cycle. A published event's row is
// deleted, so the table holds only the backlog and returns to nothing after
// one drains; rows a former version marked published are deleted at start and
// never published again; and an idle service reads no table by sequential
// scan, whatever its history.

import (
	"context"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

func TestFormerlyPublishedRowsAreDeleted(t *testing.T) {
	b := newBroker(t, false)
	_, dbURL, db := schemaWithTables(t)
	ctx := context.Background()
	// What a former version leaves: rows published an hour ago, waiting for
	// their purge, interleaved with rows still to publish. The test reads
	// outbox by no sequential scan of its own (RETURNING, then statistics):
	// the service's are counted below.
	const n = 3000
	rows, _ := db.Query(ctx, `
		INSERT INTO outbox (topic, key, event_id, payload, published_at)
		SELECT $1, g::text, gen_random_uuid(), '{}', CASE WHEN g % 2 = 0 THEN now() - interval '1 hour' END
		FROM generate_series(1, $2::int) AS g
		RETURNING event_id::text, published_at IS NULL`, b.topic(topicPayOrder), 2*n)
	var pending []string
	for rows.Next() {
		var id string
		var unpublished bool
		rows.Scan(&id, &unpublished) //nolint:errcheck // rows.Err says
		if unpublished {
			pending = append(pending, id)
		}
	}
	if err := rows.Err(); err != nil || len(pending) != n {
		t.Fatalf("%d unpublished rows, %v", len(pending), err)
	}

	s := startService(t, serviceEnv(dbURL, b))
	recs := readTopic(t, b, b.topic(topicPayOrder), 30*time.Second, func(r []*kgo.Record) bool { return len(r) >= n })
	// Every row deleted, the purge's included: their statistics are flushed.
	waitFor(t, 30*time.Second, "every row deleted", func() bool { return tableStat(t, dbURL, "outbox", "n_tup_del") >= 2*n })
	if read := tableStat(t, dbURL, "outbox", "seq_tup_read"); read != 0 {
		t.Errorf("%d rows of outbox read by sequential scans: the start-up purge read the backlog", read)
	}
	// Exactly the rows still to publish, each once; none published before.
	seen := map[string]int{}
	for _, r := range readTopicNow(t, b, b.topic(topicPayOrder)) {
		seen[headerMap(r)["event-id"]]++
	}
	for _, id := range pending {
		if seen[id] != 1 {
			t.Errorf("event %s published %d times, want once", id, seen[id])
		}
	}
	if len(seen) != n {
		t.Errorf("%d events on pay-order (%d records), want the %d unpublished ones", len(seen), len(recs), n)
	}
	if got := metric(t, s.url, "outbox_events_published_total"); got != n {
		t.Errorf("outbox_events_published_total %v, want %d", got, n)
	}
}

// A backlog drains to an empty table, which vacuum gives back to its floor.
func TestOutboxReturnsToItsFloorAfterABacklog(t *testing.T) {
	b := newBroker(t, false)
	dbURL := newSchema(t)
	startService(t, serviceEnv(dbURL, b))
	const n = 20000
	insertEvents(t, dbURL, b.topic(topicPayOrder), n)
	waitFor(t, 60*time.Second, "the backlog drained", func() bool { return count(t, dbURL, `SELECT count(*) FROM outbox`) == 0 })
	db := schemaPool(t, dbURL)
	if _, err := db.Exec(context.Background(), `VACUUM outbox`); err != nil {
		t.Fatal(err)
	}
	var pages int
	if err := db.QueryRow(context.Background(), `SELECT pg_relation_size('outbox') / current_setting('block_size')::int`).Scan(&pages); err != nil {
		t.Fatal(err)
	}
	t.Logf("outbox after a drain of %d events and a VACUUM: %d pages", n, pages)
	if pages > 1 {
		t.Errorf("outbox holds %d pages after its backlog drained and a VACUUM, want its floor (0 or 1)", pages)
	}
}

// An idle service reads neither orders nor outbox by sequential scan, with
// the relay polling every 100ms and /metrics scraped: what it does while
// idle costs the same on a table of any size.
func TestIdleServiceScansNoTable(t *testing.T) {
	b := newBroker(t, false)
	_, dbURL, db := schemaWithTables(t)
	ctx := context.Background()
	// Some history: 20 000 orders, paid, and their events long published.
	if _, err := db.Exec(ctx, `
		INSERT INTO orders (id, user_id, amount, status, created_at, updated_at)
		SELECT gen_random_uuid(), 'user-' || (g % 100), 100, 'PAID', now() - g * interval '1 second', now()
		FROM generate_series(1, 20000) AS g;
		ANALYZE orders`); err != nil {
		t.Fatal(err)
	}
	env := serviceEnv(dbURL, b)
	env["RELAY_POLL_INTERVAL"] = "100ms"
	s := startService(t, env)
	readPayOrders(t, b, []string{s.createOrder(t, "someone", 1).ID}, 10*time.Second)
	// Waited for through the service, not by counting the outbox: a
	// backend that goes idle may hold its statistics back for 10 s
	// (PGSTAT_IDLE_INTERVAL), so the rows the test's own count(*) read
	// would show up inside the idle window below.
	waitFor(t, 10*time.Second, "the outbox empty", func() bool { return metric(t, s.url, "outbox_backlog") == 0 })

	seqRead := func() int {
		// A busy backend reports its statistics at most once a second;
		// nothing shows when it has.
		time.Sleep(2 * time.Second)
		return tableStat(t, dbURL, "orders", "seq_tup_read") + tableStat(t, dbURL, "outbox", "seq_tup_read")
	}
	before := seqRead()
	for range 20 { // two seconds of idling, scraped ten times a second
		do(t, "GET", s.url+"/metrics", "")
		time.Sleep(100 * time.Millisecond) // a pace, not a wait for a condition
	}
	after := seqRead()
	t.Logf("rows read by sequential scans of orders and outbox while idle: %d", after-before)
	if after != before {
		t.Errorf("the idle service read %d rows of orders and outbox by sequential scans", after-before)
	}
}
