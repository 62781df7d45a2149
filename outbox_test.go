package main

// outbox_test.go: the relay and the outbox's life cycle. A commit wakes the
// relay; a published event's row is deleted, so the table holds only the
// backlog and returns to nothing after one drains; claims cost the same
// whatever vacuum can do and whatever the statistics say; a stalled replica
// or partition holds up no other; a database of an earlier version upgrades
// in place; and an idle service reads no table by sequential scan.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// A database left by an earlier version upgrades in place at start: its
// outbox takes the shape of a new one, the events it still held are
// published once each, and those a version before the delete-on-publish
// relay had marked published are not published again.
func TestDatabaseOfAnEarlierVersionUpgradesInPlace(t *testing.T) {
	fixtures, _ := filepath.Glob("testdata/upgrade/schema-*.sql")
	if len(fixtures) == 0 {
		t.Fatal("no testdata/upgrade/schema-*.sql")
	}
	_, _, fresh := schemaWithTables(t)
	want := outboxShape(t, fresh)
	for _, fixture := range fixtures {
		t.Run(filepath.Base(fixture), func(t *testing.T) {
			old, err := os.ReadFile(fixture)
			if err != nil {
				t.Fatal(err)
			}
			b := newBroker(t, false)
			dbURL := newSchema(t)
			db := schemaPool(t, dbURL)
			ctx := context.Background()
			if _, err := db.Exec(ctx, string(old)); err != nil {
				t.Fatal(err)
			}
			// What that version leaves: events still to publish, and
			// (where it kept them) events marked published an hour ago,
			// interleaved.
			const n = 500
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
			if got := outboxShape(t, db); !reflect.DeepEqual(got, want) {
				t.Errorf("upgraded outbox:\n%v\nwant, as a new database has it:\n%v", got, want)
			}
			waitFor(t, 30*time.Second, "the outbox empty", func() bool { return metric(t, s.url, "outbox_backlog") == 0 })
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
				t.Errorf("%d events on pay-order, want the %d unpublished ones", len(seen), n)
			}
			// A second start finds nothing left to upgrade.
			if err := applySchema(ctx, db); err != nil {
				t.Errorf("applying the schema again: %v", err)
			}
			if got := outboxShape(t, db); !reflect.DeepEqual(got, want) {
				t.Errorf("after a second start:\n%v\nwant:\n%v", got, want)
			}
		})
	}
}

// outboxShape describes the outbox table of db's schema: its columns, its
// indexes and its storage options, sorted, without names that differ from
// one schema to another.
func outboxShape(t testing.TB, db *pgxpool.Pool) []string {
	t.Helper()
	rows, _ := db.Query(context.Background(), `
		SELECT format('column %s %s %s default %s', attname, format_type(atttypid, atttypmod),
		              CASE WHEN attnotnull THEN 'not null' ELSE 'null' END,
		              coalesce(pg_get_expr(d.adbin, d.adrelid), CASE WHEN attidentity = 'a' THEN 'identity always' END, 'none'))
		FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
		WHERE attrelid = 'outbox'::regclass AND attnum > 0 AND NOT attisdropped
		UNION ALL
		SELECT 'index ' || regexp_replace(pg_get_indexdef(indexrelid), ' ON \S+\.', ' ON ')
		FROM pg_index WHERE indrelid = 'outbox'::regclass
		UNION ALL
		SELECT 'options ' || coalesce(array_to_string(reloptions, ','), '') FROM pg_class WHERE oid = 'outbox'::regclass
		ORDER BY 1`)
	shape, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return shape
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

// A transaction that took its outbox row's id, and its transaction id,
// before others did, and commits after their events were published (and the
// relay's floor moved past it), is published all the same: nothing is
// skipped for committing late.
func TestLateCommitIsPublished(t *testing.T) {
	b, dbURL, s := startStack(t)
	ctx := context.Background()
	late, err := schemaPool(t, dbURL).Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer late.Rollback(ctx) //nolint:errcheck // a no-op after Commit
	var lateID int64
	var lateXID uint64
	if err := late.QueryRow(ctx, `
		INSERT INTO outbox (topic, key, event_id, payload) VALUES ($1, 'late', gen_random_uuid(), '{}')
		RETURNING id, transaction_id`, b.topic(topicPayOrder)).Scan(&lateID, &lateXID); err != nil {
		t.Fatal(err)
	}
	// Orders committed after it: higher ids, higher transaction ids. Once
	// the relay has published them, its floor stands past the late row.
	var ids []string
	for range 20 {
		ids = append(ids, s.createOrder(t, newUser(), 1).ID)
	}
	readPayOrders(t, b, ids, 10*time.Second)
	var after int
	if err := schemaPool(t, dbURL).QueryRow(ctx, `SELECT count(*) FROM outbox`).Scan(&after); err != nil || after != 0 {
		t.Fatalf("%d outbox rows visible after the orders were published (%v), want 0", after, err)
	}
	if err := late.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	recs := readTopic(t, b, b.topic(topicPayOrder), 10*time.Second, func(recs []*kgo.Record) bool {
		return slices.ContainsFunc(recs, func(r *kgo.Record) bool { return string(r.Key) == "late" })
	})
	t.Logf("the row of id %d (transaction %d), committed after %d later ones were published, published too (%d records)",
		lateID, lateXID, len(ids), len(recs))
}

// While vacuum's horizon is held, the relay reads the index entries of what
// it publishes, not those of everything published since the horizon was
// taken: PostgreSQL cannot remove them, and a claim from the start of the
// index would walk them all, more with every minute of the hold. 100 000
// events published under a held horizon cost the relay's statements at most
// maxEntriesPerEvent index entries read per event, and an idle claim at most
// maxEntriesPerScan per index scan. The horizon is held by a snapshot alone
// (a report, pg_dump) and by a transaction that has its own transaction id
// (a session idle in a transaction after a write), which the claim floor must
// pass without waiting for it to end.
func TestClaimsDoNotWalkWhatWasPublished(t *testing.T) {
	const events, maxEntriesPerEvent, maxEntriesPerScan = 100_000, 20, 5
	for _, holder := range []struct {
		name    string
		withXID bool
	}{{"snapshot", false}, {"transaction_id", true}} {
		t.Run(holder.name, func(t *testing.T) {
			b := newBroker(t, false)
			dbURL := newSchema(t)
			env := serviceEnv(dbURL, b)
			env["RELAY_POLL_INTERVAL"] = "20ms"
			s := startService(t, env)
			holdHorizon(t, holder.withXID)
			for range events / 50 { // transactions of 50 events, as the order writers commit them
				insertEvents(t, dbURL, b.topic(topicPayOrder), 50)
			}
			waitFor(t, 120*time.Second, "every event published", func() bool {
				return metric(t, s.url, "outbox_events_published_total") == events
			})
			// Every row deleted, and the statistics of the deletes flushed:
			// the reads of the same statements are flushed with them.
			waitFor(t, 30*time.Second, "the deletes counted", func() bool { return tableStat(t, dbURL, "outbox", "n_tup_del") == events })
			if dead := tableStat(t, dbURL, "outbox", "n_dead_tup"); dead < events {
				t.Fatalf("%d dead rows in outbox after %d deletes: the horizon is not held", dead, events)
			}
			read := indexStat(t, dbURL, "outbox_pkey", "idx_tup_read")
			t.Logf("publishing %d events read %d index entries, %.1f per event", events, read, float64(read)/events)
			if read > maxEntriesPerEvent*events {
				t.Errorf("publishing %d events under a held horizon read %d index entries, %.0f per event, want at most %d",
					events, read, float64(read)/events, maxEntriesPerEvent)
			}

			// Idle: the relay claims every 20ms; /metrics reads the backlog.
			// The first 500 index scans let the last reads of the drain,
			// which the backends publish up to a second late, come in.
			after := func(n int) (scans, read int) {
				from := indexStat(t, dbURL, "outbox_pkey", "idx_scan")
				waitFor(t, 60*time.Second, fmt.Sprintf("%d more index scans", n), func() bool {
					do(t, "GET", s.url+"/metrics", "")
					return indexStat(t, dbURL, "outbox_pkey", "idx_scan") >= from+n
				})
				return indexStat(t, dbURL, "outbox_pkey", "idx_scan"), indexStat(t, dbURL, "outbox_pkey", "idx_tup_read")
			}
			scans, read := after(500)
			scans2, read2 := after(500)
			idleScans, idleRead := scans2-scans, read2-read
			t.Logf("idle: %d index scans read %d entries", idleScans, idleRead)
			if idleRead > maxEntriesPerScan*idleScans {
				t.Errorf("idle, %d index scans read %d entries of the %d dead rows, want at most %d a scan",
					idleScans, idleRead, events, maxEntriesPerScan)
			}
		})
	}
}

// Each statement of the relay, and the backlog read by /metrics, is planned
// one way whatever the outbox holds and whatever its statistics say: empty or
// a million rows, never analyzed, analyzed when it was empty, analyzed when
// it held one live row among many dead ones, analyzed as it is; with the plan
// made for the arguments (as for a statement's first five runs) or the
// generic one PostgreSQL caches after them. The plan is compared by its shape:
// node types, the relation and index each scan reads, and whether it starts
// from an index condition.
func TestRelayStatementsHaveOnePlan(t *testing.T) {
	ctx := context.Background()
	type state struct {
		rows, dead int
		analyze    string // "never", "empty" (before the rows), "now"
	}
	var states []state
	for _, rows := range []int{1, 1000, 20_000, 1_000_000} {
		for _, analyze := range []string{"never", "empty", "now"} {
			states = append(states, state{rows: rows, analyze: analyze})
		}
	}
	states = append(states, state{rows: 1, dead: 20_000, analyze: "now"})
	plans := map[string]map[string][]string{} // statement → plan → states
	for _, st := range states {
		_, _, db := schemaWithTables(t)
		if st.analyze == "empty" {
			mustExec(t, db, `ANALYZE outbox`)
		}
		mustExec(t, db, `INSERT INTO outbox (topic, key, event_id, payload)
			SELECT 'pay-order', g::text, gen_random_uuid(), '{}' FROM generate_series(1, $1::int) AS g`, st.rows+st.dead)
		if st.dead > 0 {
			mustExec(t, db, `DELETE FROM outbox WHERE id > $1`, st.rows)
		}
		if st.analyze == "now" {
			mustExec(t, db, `ANALYZE outbox`)
		}
		var some []outboxRow
		rows, _ := db.Query(ctx, `SELECT transaction_id, id FROM outbox ORDER BY transaction_id, id LIMIT 500`)
		for rows.Next() {
			var r outboxRow
			rows.Scan(&r.TransactionID, &r.ID) //nolint:errcheck // rows.Err says
			some = append(some, r)
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		floor := outboxFloor{XID: some[0].TransactionID, ID: some[0].ID, Pending: []uint64{some[0].TransactionID - 1}}
		batches := map[string]func(*pgx.Batch){
			"claim":      func(b *pgx.Batch) { queuePlannerOff(b, claimPlan...); queueClaimOutbox(b, floor, 500, time.Minute) },
			"next floor": func(b *pgx.Batch) { queuePlannerOff(b, claimPlan...); queueNextFloor(b, floor) },
			"delete":     func(b *pgx.Batch) { queuePlannerOff(b, finishPlan...); queueDeletePublished(b, some) },
			"release":    func(b *pgx.Batch) { queuePlannerOff(b, finishPlan...); queueReleaseClaims(b, some, time.Now()) },
			"backlog": func(b *pgx.Batch) {
				queuePlannerOff(b, claimPlan...)
				queueOutboxGauges(b, floor, &databaseGauges{})
			},
		}
		for name, queue := range batches {
			for _, mode := range []string{"force_custom_plan", "force_generic_plan"} {
				b := &pgx.Batch{}
				queue(b)
				plan := planShape(t, db, mode, b.QueuedQueries[0], b.QueuedQueries[1])
				key := fmt.Sprintf("%d rows, %d dead, analyzed %s, %s", st.rows, st.dead, st.analyze, mode)
				if plans[name] == nil {
					plans[name] = map[string][]string{}
				}
				plans[name][plan] = append(plans[name][plan], key)
			}
		}
	}
	for name, byPlan := range plans {
		if len(byPlan) == 1 {
			for plan := range byPlan {
				t.Logf("%s, in all %d states: %s", name, 2*len(states), plan)
			}
			continue
		}
		for plan, where := range byPlan {
			t.Errorf("%s planned as %s in %d states: %v", name, plan, len(where), where)
		}
	}
}

func mustExec(t testing.TB, db *pgxpool.Pool, sql string, args ...any) {
	t.Helper()
	if _, err := db.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// planShape prepares the statement of q and explains its execution in a
// transaction that ran settings first (a queuePlannerOff) and is rolled back,
// with plan_cache_mode set to mode, and returns the plan's shape.
func planShape(t testing.TB, db *pgxpool.Pool, mode string, settings, q *pgx.QueuedQuery) string {
	t.Helper()
	ctx := context.Background()
	tx, err := db.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // nothing of it is kept
	if _, err := tx.Exec(ctx, settings.SQL, settings.Arguments...); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `SET LOCAL plan_cache_mode = `+mode); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `PREPARE relay_statement AS `+q.SQL); err != nil {
		t.Fatalf("prepare %s: %v", q.SQL, err)
	}
	defer tx.Exec(ctx, `DEALLOCATE relay_statement`) //nolint:errcheck // a prepared statement outlives its transaction
	params := make([]string, len(q.Arguments))
	for i := range params {
		params[i] = fmt.Sprintf("$%d", i+1)
	}
	// EXPLAIN takes no parameters: the simple protocol writes them into
	// the text.
	var out []byte
	if err := tx.QueryRow(ctx, `EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE relay_statement(`+strings.Join(params, ", ")+`)`,
		append([]any{pgx.QueryExecModeSimpleProtocol}, q.Arguments...)...).Scan(&out); err != nil {
		t.Fatalf("explain %s: %v", q.SQL, err)
	}
	var explained []struct{ Plan planNode }
	if err := json.Unmarshal(out, &explained); err != nil {
		t.Fatal(err)
	}
	return explained[0].Plan.shape()
}

// planNode is a node of EXPLAIN's JSON, as much of it as planShape compares.
type planNode struct {
	NodeType  string     `json:"Node Type"`
	Relation  string     `json:"Relation Name"`
	Index     string     `json:"Index Name"`
	IndexCond string     `json:"Index Cond"`
	TIDCond   string     `json:"TID Cond"`
	Plans     []planNode `json:"Plans"`
}

func (n planNode) shape() string {
	s := n.NodeType
	if n.Relation != "" {
		s += " on " + n.Relation
	}
	if n.Index != "" {
		s += " using " + n.Index
	}
	if n.IndexCond != "" || n.TIDCond != "" {
		s += " (from a condition)"
	}
	if len(n.Plans) > 0 {
		var children []string
		for _, c := range n.Plans {
			children = append(children, c.shape())
		}
		s += " [" + strings.Join(children, ", ") + "]"
	}
	return s
}

// The holder of vacuum's horizon shows in /metrics: a session idle in a
// transaction that has its own transaction id, by its age in transactions and
// in seconds; and the outbox rows it keeps dead.
func TestHeldHorizonShowsInMetrics(t *testing.T) {
	b, _, s := startStack(t)
	if got := metric(t, s.url, `database_xmin_horizon_age_seconds{holder="session"}`); got > 5 {
		t.Fatalf("a horizon held for %v s before the test holds one", got)
	}
	held := time.Now()
	holdHorizon(t, true)
	var ids []string
	for range 20 {
		ids = append(ids, s.createOrder(t, newUser(), 1).ID)
	}
	readPayOrders(t, b, ids, 10*time.Second)
	waitFor(t, 30*time.Second, "the outbox's dead rows counted", func() bool {
		return metric(t, s.url, "outbox_dead_rows") >= float64(len(ids))
	})
	if got := metric(t, s.url, `database_xmin_horizon_age_transactions{holder="session"}`); got < float64(len(ids)) {
		t.Errorf("the held xmin is %v transactions old after %d orders were written, want at least %d", got, len(ids), len(ids))
	}
	if got, want := metric(t, s.url, `database_xmin_horizon_age_seconds{holder="session"}`), time.Since(held).Seconds(); got < want-1 || got > want+1 {
		t.Errorf("the horizon was held %v s ago by the metric, %.1f s by the test", got, want)
	}
	for _, kind := range []string{"replication_slot", "replication_slot_catalog", "prepared_transaction"} {
		if got := metric(t, s.url, `database_xmin_horizon_age_transactions{holder="`+kind+`"}`); got != 0 {
			t.Errorf("%s holds an xmin %v transactions old; none exists", kind, got)
		}
	}
}

// With the fallback poll an hour away, only the wake-up that follows the
// order's commit (notifier.announce) can get its event out within the
// deadline.
func TestRelayWakesOnCommitAndDeletesPublishedRows(t *testing.T) {
	b, dbURL, s := startStackWith(t, map[string]string{
		"RELAY_POLL_INTERVAL": "1h",
	})
	user := newUser()
	for range 3 {
		// Let the relay go idle (waiting on NOTIFY) before each order.
		time.Sleep(50 * time.Millisecond) // not a wait for a condition: it sets one up
		o := s.createOrder(t, user, 1)
		readPayOrders(t, b, []string{o.ID}, 3*time.Second)
	}
	waitFor(t, 10*time.Second, "published rows deleted", func() bool {
		return count(t, dbURL, `SELECT count(*) FROM outbox`) == 0
	})
	if n := count(t, dbURL, `SELECT count(*) FROM orders`); n != 3 {
		t.Errorf("the relay's deletes touched orders: %d left", n)
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

// A partition that takes no write does not hold back the events of the other
// partitions: the relay marks what the broker acknowledged and leaves the
// rest for the next try. (Against a 3-node cluster this is a killed leader:
// its partitions wait for a new one, the others go on.)
func TestRelayPublishesThePartitionsThatTakeWrites(t *testing.T) {
	b, dbURL, s, user := startWithBrokerFaults(t)
	const (
		normal = iota
		refuseAll
		refusePartition0 // the others acknowledged (and not stored: the test reads the outbox)
	)
	var mode atomic.Int32
	mode.Store(refuseAll)
	b.cluster.ControlKey(kmsg.Produce.Int16(), func(req kmsg.Request) (kmsg.Response, error, bool) {
		m := mode.Load()
		if m == normal {
			return nil, nil, false
		}
		b.cluster.KeepControl()
		resp := refuseProduce(req.(*kmsg.ProduceRequest), kerr.NotEnoughReplicas)
		for i := range resp.Topics {
			for j := range resp.Topics[i].Partitions {
				if p := &resp.Topics[i].Partitions[j]; m == refusePartition0 && p.Partition != 0 {
					p.ErrorCode = 0
				}
			}
		}
		return resp, nil, true
	})
	// Thirty orders wait in the outbox, so that every claim holds records
	// of every partition.
	var ids []string
	for range 30 {
		ids = append(ids, s.createOrder(t, user, 2).ID)
	}
	published := func() int { // the outbox deletes a row once its event is published
		return len(ids) - count(t, dbURL, `SELECT count(*) FROM outbox WHERE key = ANY($1)`, ids)
	}
	if n := published(); n != 0 {
		t.Fatalf("%d events published while every write was refused", n)
	}
	// One try of all thirty has failed: from now on each claim holds them all.
	waitFor(t, 10*time.Second, "a failed try of all 30 records", func() bool {
		return strings.Contains(s.logs.String(), "of 30 records")
	})
	mode.Store(refusePartition0)
	waitFor(t, 10*time.Second, "the events of partitions 1 and 2 published while partition 0 refuses", func() bool { return published() > 0 })
	if n := published(); n == len(ids) {
		t.Errorf("all %d events published while partition 0 refused every write", n)
	}
	mode.Store(normal)
	waitDrained(t, dbURL)
}

// An event is stamped published when the broker acknowledged its record, not
// when its batch ended: a batch ends with its slowest partition, which may
// retry for the whole produce deadline while the others were written at once.
// The same moment is what order_publish_latency_seconds observes.
func TestPublishLatencyIsEachRecordsAcknowledgement(t *testing.T) {
	b := newBroker(t, true)
	dbURL := newSchema(t)
	s := startService(t, serviceEnv(dbURL, b)) // the 10s produce deadline
	var (
		acked    atomic.Int64 // records of partitions 1 and 2, acknowledged (not stored) in the first request
		ackedAt  atomic.Int64 // when, in Unix microseconds
		refusals atomic.Int32 // of partition 0 since then
		holding  atomic.Bool
	)
	holding.Store(true)
	b.cluster.ControlKey(kmsg.Produce.Int16(), func(req kmsg.Request) (kmsg.Response, error, bool) {
		if !holding.Load() {
			return nil, nil, false
		}
		b.cluster.KeepControl()
		pr := req.(*kmsg.ProduceRequest)
		resp := refuseProduce(pr, kerr.NotEnoughReplicas)
		for i, rt := range pr.Topics {
			for j, rp := range rt.Partitions {
				if rp.Partition == 0 {
					refusals.Add(1)
					continue
				}
				var batch kmsg.RecordBatch
				if err := batch.ReadFrom(rp.Records); err != nil {
					t.Errorf("record batch of partition %d: %v", rp.Partition, err)
				}
				acked.Add(int64(batch.NumRecords))
				resp.Topics[i].Partitions[j].ErrorCode = 0
			}
		}
		if ackedAt.Load() == 0 && acked.Load() > 0 {
			refusals.Store(0)
			ackedAt.Store(time.Now().UnixMicro())
		}
		return resp, nil, true
	})
	// Thirty events in one commit, so that the first claim holds them all.
	const events = 30
	insertEvents(t, dbURL, b.topic(topicPayOrder), events)
	// kgo retries partition 0 after 50ms, 100ms, 200ms, 250ms, ...: four
	// refusals after the others' acknowledgement put 600ms or more between
	// the two.
	waitFor(t, 10*time.Second, "partition 0 refused four times after the others were acknowledged", func() bool {
		return ackedAt.Load() != 0 && refusals.Load() >= 4
	})
	var created time.Time
	if err := schemaPool(t, dbURL).QueryRow(context.Background(), `SELECT max(created_at) FROM outbox`).Scan(&created); err != nil {
		t.Fatal(err)
	}
	holding.Store(false)
	released := time.Now()
	waitDrained(t, dbURL)

	first := time.UnixMicro(ackedAt.Load())
	t.Logf("%d events acknowledged %s after their commit, %s before partition 0 took its %d",
		acked.Load(), first.Sub(created).Round(time.Millisecond), released.Sub(first).Round(time.Millisecond), events-acked.Load())
	if acked.Load() == 0 || acked.Load() == events {
		t.Fatalf("%d of %d records in partitions 1 and 2: the test needs both kinds", acked.Load(), events)
	}
	if d := first.Sub(created); d > 400*time.Millisecond {
		t.Fatalf("the first acknowledgement came %s after the commit: too late to tell it from partition 0's", d)
	}
	// Each record's latency is its own acknowledgement: those acknowledged
	// at once fall within 0.5s, partition 0's after it. Observed at the
	// batch's end, all thirty would fall after.
	if n := metric(t, s.url, "order_publish_latency_seconds_count"); n != events {
		t.Errorf("order_publish_latency_seconds_count %v, want %d", n, events)
	}
	if n := metric(t, s.url, `order_publish_latency_seconds_bucket{le="0.5"}`); n != float64(acked.Load()) {
		t.Errorf("%v publish latencies within 0.5s, want the %d acknowledged before partition 0 took writes", n, acked.Load())
	}
}

// A relay whose broker stalls holds its claimed rows, and the other replica's
// relay publishes everything else meanwhile: SKIP LOCKED, not waiting on the
// held rows. The replicas share the database but not the broker, so that
// only one of them stalls. The other replica never polls: it learns of the
// stalled one's new orders only from its announcement (notifier.announce).
func TestStalledReplicaDoesNotHoldUpTheOther(t *testing.T) {
	bA, bB := newBroker(t, true), newBroker(t, true)
	dbURL := newSchema(t)
	envA := serviceEnv(dbURL, bA)
	envA["RELAY_PRODUCE_TIMEOUT"] = "1m"
	envA["SHUTDOWN_TIMEOUT"] = "2s" // it abandons the stalled batch at exit
	a := startService(t, envA)
	user := newUser()
	readPayOrders(t, bA, []string{a.createOrder(t, user, 1).ID}, 10*time.Second)
	release := swallow(bA, kmsg.Produce)
	defer release()
	held := a.createOrder(t, user, 2)
	waitClaimed(t, dbURL)

	// B's broker, with A's topic names: the replicas' outbox rows name
	// their topic, so both must use the same ones.
	envB := serviceEnv(dbURL, bB)
	envB["KAFKA_TOPIC_PREFIX"] = bA.prefix
	envB["RELAY_POLL_INTERVAL"] = "1h"
	bB = &broker{addrs: bB.addrs, prefix: bA.prefix, cluster: bB.cluster}
	b := startService(t, envB)
	var ids []string
	for range 20 {
		ids = append(ids, b.createOrder(t, user, 3).ID)
	}
	readPayOrders(t, bB, ids, 10*time.Second)
	fromA := a.createOrder(t, user, 4)
	readPayOrders(t, bB, []string{fromA.ID}, 5*time.Second)
	if n := count(t, dbURL, `SELECT count(*) FROM outbox WHERE key = $1`, held.ID); n != 1 {
		t.Errorf("the stalled replica's row was published meanwhile")
	}
}
