package main

// store.go holds every SQL statement of the service, one function per
// statement, and the transactions built of them: an order with its outbox
// row, a poll of payment results. Connecting is database.go's, classifying
// errors dberrors.go's.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// outboxChannel is the LISTEN/NOTIFY channel that wakes the relay.
const outboxChannel = "order_service_outbox"

var (
	errNotFound            = errors.New("not found")
	errIdempotencyConflict = errors.New("idempotency key reused with a different request")
)

// dbtx is what both *pgxpool.Pool and pgx.Tx offer, so every statement below
// runs inside or outside a transaction alike.
type dbtx interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Order is both the row and the JSON the API answers with.
type Order struct {
	ID            string    `json:"id"`
	UserID        string    `json:"user_id"`
	Amount        int64     `json:"amount"`
	Description   string    `json:"description"`
	Status        string    `json:"status"`
	FailureReason *string   `json:"failure_reason,omitempty"`
	CreatedAt     time.Time `json:"created_at"`
	UpdatedAt     time.Time `json:"updated_at"`
}

// newOrder is what a POST /orders asks for.
type newOrder struct {
	ID             string
	UserID         string
	Amount         int64
	Description    string
	IdempotencyKey *string
	RequestHash    []byte
	Traceparent    string // W3C trace context of the request, for its event
	Tracestate     string
}

// createResult is the outcome of one request in a batch.
type createResult struct {
	Order   Order
	Created bool  // false: an idempotent replay of an earlier request
	Err     error // errIdempotencyConflict, for this request alone
}

// createOrders is the transactional outbox: every order row and the event
// that announces it commit together or not at all. It writes a whole batch of
// requests in one transaction (see orderWriter), so concurrent requests share
// one commit, one WAL flush; results[i] answers in[i].
//
// It costs one round trip: BEGIN, the one statement that writes orders and
// events, and COMMIT go together in a pipeline. Should the statement fail, the
// server skips the rest up to the pipeline's end, COMMIT included, and the
// deferred Rollback ends the failed transaction. The commit sends no NOTIFY:
// that takes a cluster-wide lock held through the WAL flush, and would make
// every order commit wait for the one before it. The caller wakes the relays
// once the commit is done (see notifier.announce).
//
// The outcome is read from the answers as they come. COMMIT's own answer
// (CommandComplete) means the orders are stored, whatever follows it: a
// server process told to terminate while it flushes a commit (a fast
// shutdown, pg_terminate_backend, a switchover) finishes the commit, answers
// it, and only then sends FATAL. A statement's ERROR before that means the
// server skipped the rest, COMMIT included: nothing is stored. Anything else
// after the pipeline was sent (the connection broke, a FATAL or PANIC came
// first, ctx ended while the server was still at work) leaves the outcome
// unknown: the error is a *commitUnknownError naming the server process that
// held the transaction, so that the caller can end that process and then look
// for the orders (orderWriter.settle).
func createOrders(ctx context.Context, db *pgxpool.Pool, topic string, in []newOrder) ([]createResult, error) {
	conn, err := db.Acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("write orders: %w", err)
	}
	proc := serverProcessOf(conn.Conn().PgConn())
	b := &pgx.Batch{}
	b.BeginTx(pgx.TxOptions{})
	inserted := queueInsertOrders(b, topic, in)
	committed, err := sendTx(ctx, conn, b)
	conn.Release() // before the lookups below: after a FATAL it is closed
	var pgErr *pgconn.PgError
	switch {
	case committed:
		// Replays are looked up on the pool: the connection may be gone.
		return orderAnswers(ctx, db, in, inserted, true), nil
	case errors.As(err, &pgErr) && pgErr.Severity == "ERROR", pgconn.SafeToRetry(err):
		return nil, fmt.Errorf("write orders: %w", err)
	default:
		return nil, &commitUnknownError{proc: proc, err: err}
	}
}

// orderAnswers gives each request its answer once its transaction is over:
// the order it inserted, else (ON CONFLICT skipped it: the key was used
// before, by an earlier request or by one earlier in this batch) the order
// stored under its Idempotency-Key, or 409 if that order came with another
// body. Read after the commit, a stored order is committed: ON CONFLICT waited
// for the transaction that inserted it. A lookup that fails fails its own
// request only: the others' orders are committed and must be answered so.
//
// committed says the transaction committed and its rows are all in
// inserted. Otherwise (a settled commit, see orderWriter.settle) a request
// that finds no order was not written, and gets errNotWritten.
func orderAnswers(ctx context.Context, db dbtx, in []newOrder, inserted map[string]Order, committed bool) []createResult {
	results := make([]createResult, len(in))
	for i, req := range in {
		if o, ok := inserted[req.ID]; ok {
			results[i] = createResult{Order: o, Created: true}
			continue
		}
		if req.IdempotencyKey == nil {
			results[i] = createResult{Err: errNotWritten}
			if committed {
				results[i].Err = fmt.Errorf("order %s committed but not returned", req.ID)
			}
			continue
		}
		o, hash, err := getOrderByIdempotencyKey(ctx, db, req.UserID, *req.IdempotencyKey)
		switch {
		case errors.Is(err, errNotFound) && !committed:
			results[i] = createResult{Err: errNotWritten}
		case err != nil:
			results[i] = createResult{Err: err}
		case string(hash) != string(req.RequestHash):
			results[i] = createResult{Err: errIdempotencyConflict}
		default:
			results[i] = createResult{Order: o}
		}
	}
	return results
}

// commitUnknownError is a pipeline whose answer was lost: the server process
// proc may have committed its transaction, may yet, or may not.
type commitUnknownError struct {
	proc serverProcess
	err  error
}

func (e *commitUnknownError) Error() string {
	return fmt.Sprintf("orders' commit unanswered by server process %d: %v", e.proc.PID, e.err)
}

func (e *commitUnknownError) Unwrap() error { return e.err }

// queueInsertOrders queues the statement that inserts the batch's orders in
// their given order, each with its pay-order event in the outbox. Once the
// batch is read, inserted holds the rows it inserted by id (a row whose
// (user, Idempotency-Key) exists is skipped, and has no event). The caller
// sorts batches by key, so two batches lock keys in the same order and cannot
// deadlock.
//
// The event is built here, from the inserted row, so that it needs no round
// trip of its own. Its payload is row_to_json of (event_id, order_id,
// user_id, amount, created_at), created_at in the session's time zone (UTC,
// see connectDB); the relay sends it byte for byte. Its event_id is a version
// 7 UUID made here, like the order's id: unique by construction, with no
// index to enforce it (schema.sql).
func queueInsertOrders(b *pgx.Batch, topic string, in []newOrder) (inserted map[string]Order) {
	ids, users, descs := make([]string, len(in)), make([]string, len(in)), make([]string, len(in))
	amounts, keys, hashes := make([]int64, len(in)), make([]*string, len(in)), make([][]byte, len(in))
	events, parents, states := make([]string, len(in)), make([]string, len(in)), make([]string, len(in))
	for i, o := range in {
		ids[i], users[i], amounts[i], descs[i], keys[i], hashes[i] = o.ID, o.UserID, o.Amount, o.Description, o.IdempotencyKey, o.RequestHash
		events[i], parents[i], states[i] = newUUID(), o.Traceparent, o.Tracestate
	}
	inserted = make(map[string]Order, len(in))
	b.Queue(`
		WITH r AS (
		    SELECT * FROM unnest($2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::bytea[], $8::uuid[], $9::text[], $10::text[])
		         WITH ORDINALITY AS r(id, user_id, amount, description, idempotency_key, request_hash, event_id, traceparent, tracestate, n)
		), o AS (
		    INSERT INTO orders (id, user_id, amount, description, idempotency_key, request_hash)
		    SELECT id, user_id, amount, description, idempotency_key, request_hash FROM r ORDER BY n
		    ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
		    RETURNING `+orderColumns+`
		), e AS (
		    INSERT INTO outbox (topic, key, event_id, payload, traceparent, tracestate)
		    SELECT $1, p.order_id::text, p.event_id, to_json(p), NULLIF(r.traceparent, ''), NULLIF(r.tracestate, '')
		    FROM o JOIN r USING (id)
		         CROSS JOIN LATERAL (SELECT r.event_id, o.id AS order_id, o.user_id, o.amount, o.created_at) p
		    ORDER BY r.n
		)
		SELECT * FROM o`,
		topic, ids, users, amounts, descs, keys, hashes, events, parents, states,
	).Query(func(rows pgx.Rows) error {
		if err := scanOrdersByID(rows, inserted); err != nil {
			return fmt.Errorf("insert orders: %w", err)
		}
		return nil
	})
	return inserted
}

// orderColumns is the select list of an Order, in scanOrder's order.
const orderColumns = `id, user_id, amount, description, status, failure_reason, created_at, updated_at`

// scanOrder reads a row of orderColumns, then of extra columns into extra.
// It scans by position, not by name (pgx.RowToStructByName): it is on the
// create path of every order.
func scanOrder(row pgx.Row, extra ...any) (Order, error) {
	var o Order
	err := row.Scan(append([]any{&o.ID, &o.UserID, &o.Amount, &o.Description, &o.Status, &o.FailureReason,
		&o.CreatedAt, &o.UpdatedAt}, extra...)...)
	if errors.Is(err, pgx.ErrNoRows) {
		return Order{}, errNotFound // the one place "no such order" is named
	}
	return o.utc(), err
}

// scanOrdersByID reads rows of orderColumns into byID.
func scanOrdersByID(rows pgx.Rows, byID map[string]Order) error {
	_, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (struct{}, error) {
		o, err := scanOrder(row)
		byID[o.ID] = o
		return struct{}{}, err
	})
	return err
}

func getOrderByIdempotencyKey(ctx context.Context, db dbtx, userID, key string) (Order, []byte, error) {
	var hash []byte
	o, err := scanOrder(db.QueryRow(ctx, `
		SELECT `+orderColumns+`, request_hash
		FROM orders
		WHERE user_id = $1 AND idempotency_key = $2`,
		userID, key), &hash)
	if err != nil {
		return Order{}, nil, fmt.Errorf("get order by idempotency key: %w", err)
	}
	return o, hash, nil
}

// notify sends a notification on channel; PostgreSQL delivers it when the
// transaction commits (at once, outside a transaction).
func notify(ctx context.Context, db dbtx, channel, payload string) error {
	if _, err := db.Exec(ctx, `SELECT pg_notify($1, $2)`, channel, payload); err != nil {
		return fmt.Errorf("notify %s: %w", channel, err)
	}
	return nil
}

// serverProcess is the server process behind a connection: its id, and when
// it started, since an id is reused once its process has exited.
type serverProcess struct {
	PID   uint32
	Start time.Time
}

// serverProcessKey keeps, in each pooled connection's CustomData, the server
// process behind it as the server itself reports it (connectDB). The id the
// connection's handshake announced is not enough: a pooler in session mode
// hands its clients made-up ids, and settling a lost commit must end the real
// process (endBackend).
const serverProcessKey = "order-service.server-process"

// serverProcessOf is the server process behind c (see serverProcessKey).
func serverProcessOf(c *pgconn.PgConn) serverProcess {
	if p, ok := c.CustomData()[serverProcessKey].(serverProcess); ok {
		return p
	}
	return serverProcess{PID: c.PID()}
}

// getServerProcess asks the server which process serves this connection.
func getServerProcess(ctx context.Context, db dbtx) (serverProcess, error) {
	var p serverProcess
	var pid int32
	err := db.QueryRow(ctx, `SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()`).Scan(&pid, &p.Start)
	if err != nil {
		return p, fmt.Errorf("server process: %w", err)
	}
	p.PID = uint32(pid)
	return p, nil
}

// endBackend ends the server process p, if it is still there, and waits for
// it to exit, for at most wait: then its transaction is over, committed or
// rolled back, and will not change. It reports whether the process is gone.
// A process with p's id but a later start is another one, which has reused
// the id, and is left alone; so is a process of another role. It refuses
// to conclude anything on a server in recovery, a standby, where the process
// would look gone: errReadOnly.
func endBackend(ctx context.Context, db dbtx, p serverProcess, wait time.Duration) (bool, error) {
	var standby bool
	var ended *bool
	err := db.QueryRow(ctx, `
		SELECT pg_is_in_recovery(),
		       (SELECT pg_terminate_backend(pid, $3)
		        FROM pg_stat_activity
		        WHERE pid = $1 AND backend_start = $2 AND usename = current_user AND pid <> pg_backend_pid())`,
		int64(p.PID), p.Start, wait.Milliseconds()).Scan(&standby, &ended)
	switch {
	case err != nil:
		return false, fmt.Errorf("end server process %d: %w", p.PID, err)
	case standby:
		return false, fmt.Errorf("end server process %d: %w", p.PID, errReadOnly)
	}
	return ended == nil || *ended, nil
}

// getOrdersByID reads the orders of ids that exist.
func getOrdersByID(ctx context.Context, db dbtx, ids []string) (map[string]Order, error) {
	rows, err := db.Query(ctx, `
		SELECT `+orderColumns+`
		FROM orders
		WHERE id = ANY($1::uuid[])`, ids)
	if err != nil {
		return nil, fmt.Errorf("get orders by id: %w", err)
	}
	defer rows.Close()
	found := make(map[string]Order, len(ids))
	if err := scanOrdersByID(rows, found); err != nil {
		return nil, fmt.Errorf("get orders by id: %w", err)
	}
	return found, nil
}

// checkWritable is the readiness check: the database answers and takes
// writes. A connection that finds it read-only is closed, so that the pool
// connects anew (perhaps to the new primary) instead of keeping it.
func checkWritable(ctx context.Context, db *pgxpool.Pool) error {
	c, err := db.Acquire(ctx)
	if err != nil {
		return err
	}
	defer c.Release()
	var readOnly bool
	if err := c.QueryRow(ctx, `SELECT current_setting('transaction_read_only') = 'on'`).Scan(&readOnly); err != nil {
		return err
	}
	if readOnly {
		c.Conn().Close(ctx) //nolint:errcheck // closing is all we want
		return errReadOnly
	}
	return nil
}

// getOrder returns the order only to its owner: another user's order is
// errNotFound, so ids cannot be probed.
func getOrder(ctx context.Context, db dbtx, userID, id string) (Order, error) {
	o, err := scanOrder(db.QueryRow(ctx, `
		SELECT `+orderColumns+`
		FROM orders
		WHERE id = $1 AND user_id = $2`,
		id, userID))
	if err != nil {
		return Order{}, fmt.Errorf("get order: %w", err)
	}
	return o, nil
}

// pageKey is a position in a user's orders, newest first.
type pageKey struct {
	CreatedAt time.Time
	ID        string
}

// firstPage sorts after every real order, so the first page and the next ones
// share one statement and one index scan.
var firstPage = pageKey{CreatedAt: time.Date(9999, 12, 31, 0, 0, 0, 0, time.UTC), ID: "ffffffff-ffff-ffff-ffff-ffffffffffff"}

// listOrders is keyset paging: it seeks past the last order of the previous
// page in the (user_id, created_at DESC, id DESC) index instead of counting
// rows with OFFSET, so a page costs the same however deep it is and orders
// created meanwhile neither repeat nor vanish.
func listOrders(ctx context.Context, db dbtx, userID string, after pageKey, limit int) ([]Order, error) {
	rows, _ := db.Query(ctx, `
		SELECT `+orderColumns+`
		FROM orders
		WHERE user_id = $1 AND (created_at, id) < ($2, $3)
		ORDER BY created_at DESC, id DESC
		LIMIT $4`,
		userID, after.CreatedAt, after.ID, limit)
	orders, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Order, error) { return scanOrder(row) })
	if err != nil {
		return nil, fmt.Errorf("list orders: %w", err)
	}
	return orders, nil
}

// outboxRow is one claimed event.
type outboxRow struct {
	TransactionID uint64     `db:"transaction_id"` // an xid8; with ID, the row's primary key
	ID            int64      `db:"id"`
	Topic         string     `db:"topic"`
	Key           string     `db:"key"`
	EventID       string     `db:"event_id"`
	Payload       []byte     `db:"payload"`
	Traceparent   *string    `db:"traceparent"`
	Tracestate    *string    `db:"tracestate"`
	CreatedAt     time.Time  `db:"created_at"`
	LeaseUntil    *time.Time `db:"lease_until"` // the claim's, to release only its own rows
}

// outboxKeys are the primary keys of rows, as the arrays a statement reads
// them from.
func outboxKeys(rows []outboxRow) (xids []uint64, ids []int64) {
	xids, ids = make([]uint64, len(rows)), make([]int64, len(rows))
	for i, r := range rows {
		xids[i], ids[i] = r.TransactionID, r.ID
	}
	return xids, ids
}

// outboxFloor is where the outbox rows still to publish begin, in the claim
// index's order: every such row comes at or after (XID, ID), or belongs to
// one of Pending, transactions that were still open when the floor passed
// them. Starting there, a claim never walks the index entries of rows
// published before; PostgreSQL cannot remove those while anything holds
// vacuum's xmin horizon back, and a claim from the start of the index would
// read every one of them. The zero floor is where a relay starts: the whole
// table.
type outboxFloor struct {
	XID     uint64 // an xid8
	ID      int64
	Pending []uint64 // xid8s
}

// queuePlannerOff queues the statement that plans the rest of the
// transaction with the given settings off, plan types ("enable_sort",
// "enable_seqscan", ...) and "jit", and with no parallel workers, whose start
// a statement of a few hundred rows never earns back. They are settings of
// the planner's costs, not prohibitions (a plan that needs a sort still gets
// one), and they end with the transaction.
//
// They are needed because the planner's choice depends on statistics that a
// new or just-grown table does not have, and because a generic plan, which
// PostgreSQL caches after a statement's fifth run on a connection, stays as
// it was made until the next ANALYZE. Switching off every way but the one
// wanted leaves the planner one plan, whatever the statistics say:
//
//   - The relay's claim must walk the outbox's primary key from its floor
//     and stop after limit rows, however many wait (claimPlan); its delete
//     must look up each row by its key (finishPlan).
//   - The consumer's UPDATE of orders by id, cached while orders was small,
//     becomes a hash join over a sequential scan of every order, where the
//     primary key reads one row per result. The consumer turns off
//     sequential scans.
//
// docs/history.md has the measurements.
func queuePlannerOff(b *pgx.Batch, settings ...string) {
	b.Queue(`
		SELECT set_config(name, 'off', true) FROM unnest($1::text[]) AS name
		UNION ALL
		SELECT set_config('max_parallel_workers_per_gather', '0', true)`, settings)
}

// claimPlan is what the claim and the next floor are planned with: index
// scans of the outbox's primary key from where the statement starts reading,
// no sort, no join but a nested loop, nothing materialized or memoized; and
// no JIT compilation, which a statement that reads a few hundred rows never
// earns back.
var claimPlan = []string{"enable_seqscan", "enable_bitmapscan", "enable_sort", "enable_hashjoin", "enable_mergejoin",
	"enable_material", "enable_memoize", "jit"}

// finishPlan is what the delete and the release are planned with: each row
// looked up by its key (outboxRowsByKey), a bitmap scan at a time.
var finishPlan = []string{"enable_seqscan", "enable_indexscan", "enable_sort", "enable_hashjoin", "enable_mergejoin",
	"enable_material", "enable_memoize", "jit"}

// queueClaimOutbox queues the statement that claims up to limit rows from
// floor on, in the primary key's order, for lease: it stamps them with
// lease_until and returns them; once the batch is read, *claimed holds them.
// The claim commits at once and the rows are published outside any
// transaction: no transaction stays open while the broker is asked, and
// vacuum's horizon never waits for it. Until the lease ends, other claims
// pass the rows by; a relay that dies holding them leaves them to be claimed
// again when it does.
//
// The rows are chosen once, with FOR UPDATE SKIP LOCKED, so that several
// relays (and a relay's workers) claim side by side, each taking rows no
// other claim is stamping. The update then takes the row versions chosen by
// their physical address (ctid): a TID scan, the one plan that reads
// nothing else, whatever the statistics say. An address is safe to use
// here, inside the statement that locked the row, and nowhere else: a row
// updated since has another. Plan it with claimPlan.
func queueClaimOutbox(b *pgx.Batch, floor outboxFloor, limit int, lease time.Duration) (claimed *[]outboxRow) {
	claimed = new([]outboxRow)
	b.Queue(`
		WITH from_floor AS MATERIALIZED (
		    SELECT ctid FROM outbox
		    WHERE (transaction_id, id) >= ($1, $2) AND (lease_until IS NULL OR lease_until < now())
		    ORDER BY transaction_id, id
		    LIMIT $4
		    FOR UPDATE SKIP LOCKED
		), pending AS MATERIALIZED (
		    SELECT ctid FROM outbox
		    WHERE transaction_id = ANY($3) AND (lease_until IS NULL OR lease_until < now())
		    LIMIT $4
		    FOR UPDATE SKIP LOCKED
		)
		UPDATE outbox SET lease_until = now() + $5::interval
		WHERE ctid = ANY(ARRAY((SELECT ctid FROM pending UNION ALL SELECT ctid FROM from_floor) LIMIT $4))
		RETURNING transaction_id, id, topic, key, event_id, payload, traceparent, tracestate, created_at, lease_until`,
		floor.XID, floor.ID, floor.Pending, limit, lease,
	).Query(func(rows pgx.Rows) error {
		var err error
		if *claimed, err = pgx.CollectRows(rows, pgx.RowToStructByName[outboxRow]); err != nil {
			return fmt.Errorf("claim outbox: %w", err)
		}
		slices.SortFunc(*claimed, func(a, b outboxRow) int {
			return cmp.Or(cmp.Compare(a.TransactionID, b.TransactionID), cmp.Compare(a.ID, b.ID))
		})
		return nil
	})
	return claimed
}

// queueNextFloor queues the statement that moves floor up to where the rows
// still to publish begin now; once the batch is read, *next holds it. In one
// snapshot it finds the first row left from floor on, leased or not: the new
// floor is that row, or, if there is none, the snapshot's xmax (the first
// transaction id not yet given out). A row's transaction has committed, so
// it will write no row before it. Transactions still open below the new
// floor may yet commit rows there: they join Pending, and stay in it while
// they are open or have rows left. Plan it with claimPlan.
func queueNextFloor(b *pgx.Batch, floor outboxFloor) (next *outboxFloor) {
	next = new(outboxFloor)
	b.Queue(`
		WITH s AS MATERIALIZED (
		    SELECT snap, coalesce(first.transaction_id, pg_snapshot_xmax(snap)) AS xid, coalesce(first.id, 0) AS id
		    FROM pg_current_snapshot() AS snap
		    LEFT JOIN LATERAL (
		        SELECT transaction_id, id FROM outbox
		        WHERE (transaction_id, id) >= ($1, $2)
		        ORDER BY transaction_id, id
		        LIMIT 1
		    ) AS first ON true
		)
		SELECT xid, id, ARRAY(
		    SELECT x FROM pg_snapshot_xip(snap) AS x WHERE x < xid
		    UNION
		    SELECT p FROM unnest($3::xid8[]) AS p
		    WHERE NOT pg_visible_in_snapshot(p, snap)
		       OR p IN (SELECT transaction_id FROM outbox WHERE transaction_id = ANY($3)))
		FROM s`,
		floor.XID, floor.ID, floor.Pending,
	).QueryRow(func(row pgx.Row) error {
		if err := row.Scan(&next.XID, &next.ID, &next.Pending); err != nil {
			return fmt.Errorf("next claim floor: %w", err)
		}
		return nil
	})
	return next
}

// queueDeletePublished queues the statement that deletes the rows whose
// events the broker acknowledged. The outbox is a queue and Kafka the log: a
// published event has nothing left to do here, so the table holds only what
// waits, and nothing the service reads grows with its history. Each row is
// written twice after its insert (the lease, the delete). Plan it with
// finishPlan.
func queueDeletePublished(b *pgx.Batch, rows []outboxRow) {
	xids, ids := outboxKeys(rows)
	b.Queue(`DELETE FROM outbox WHERE ctid = ANY(`+outboxRowsByKey+`)`, xids, ids)
}

// queueReleaseClaims queues the statement that gives back claimed rows whose
// produce failed, so that the next claim retries them at once rather than
// when their lease ends; a row another relay has claimed since is not its to
// release. Plan it with finishPlan.
func queueReleaseClaims(b *pgx.Batch, rows []outboxRow, leaseUntil time.Time) {
	xids, ids := outboxKeys(rows)
	b.Queue(`UPDATE outbox SET lease_until = NULL WHERE ctid = ANY(`+outboxRowsByKey+`) AND lease_until = $3`,
		xids, ids, leaseUntil)
}

// outboxRowsByKey is the array of the physical addresses (ctid) of the rows
// whose keys are $1 (transaction ids) and $2 (ids), each looked up on its
// own. Written as a join, the lookup would be planned, when the statistics
// say the outbox holds a row or two, as one walk of the whole index matched
// against the keys: a walk of every entry of every row deleted since vacuum
// last could run. Looked up one key at a time, with plain index scans off
// (finishPlan), a key can only be found through its index condition. The
// address is used in the statement that found it and nowhere else; a row
// updated meanwhile by another transaction has another address, and the
// statement passes it by.
const outboxRowsByKey = `ARRAY(
		    SELECT (SELECT ctid FROM outbox o WHERE o.transaction_id = k.transaction_id AND o.id = k.id)
		    FROM unnest($1::xid8[], $2::bigint[]) AS k(transaction_id, id))`

// paymentResult is a payment-results value. Unknown fields are accepted: the
// Payment Service may add some without breaking us. Known ones must be spelled
// exactly, once each (checkKeys).
type paymentResult struct {
	OrderID string  `json:"order_id"`
	Status  string  `json:"status"`
	Reason  *string `json:"reason"`
}

// applyPaymentResults moves PENDING orders to PAID or FAILED, a whole poll
// of results in one transaction, and returns the ids it changed. The status
// in the WHERE clause is what makes the consumer idempotent: a redelivered or
// conflicting result matches no row and changes nothing. The NOTIFY reaches
// every replica's status listeners at commit. Each order appears at most once
// in results: UPDATE ... FROM would apply an arbitrary one of two.
func applyPaymentResults(ctx context.Context, db *pgxpool.Pool, results []paymentResult) (map[string]time.Time, error) {
	if len(results) == 0 {
		return nil, nil
	}
	ids, statuses, reasons := make([]string, len(results)), make([]string, len(results)), make([]*string, len(results))
	for i, r := range results {
		ids[i], statuses[i], reasons[i] = r.OrderID, r.Status, r.Reason
	}
	// changed maps each order that changed to its creation time, for the
	// pipeline's latency.
	changed := map[string]time.Time{}
	// BEGIN, the planner's settings, the UPDATE with its notifications
	// (delivered at commit) and COMMIT go in one round trip.
	b := &pgx.Batch{}
	b.BeginTx(pgx.TxOptions{})
	queuePlannerOff(b, "enable_seqscan")
	b.Queue(`
		WITH changed AS (
		    UPDATE orders o
		    SET status = r.status, failure_reason = r.reason, updated_at = now()
		    FROM unnest($1::uuid[], $2::text[], $3::text[]) AS r(id, status, reason)
		    WHERE o.id = r.id AND o.status = 'PENDING'
		    RETURNING o.id::text AS id, o.created_at)
		SELECT id, created_at, pg_notify($4, id) FROM changed`,
		ids, statuses, reasons, statusChannel,
	).Query(func(rows pgx.Rows) error {
		var id string
		var created time.Time
		_, err := pgx.ForEachRow(rows, []any{&id, &created, nil}, func() error {
			changed[id] = created
			return nil
		})
		return err
	})
	if committed, err := sendTx(ctx, db, b); !committed {
		return nil, fmt.Errorf("apply payment results: %w", err)
	}
	return changed, nil
}

// statusChannel carries the id of an order whose status just changed.
const statusChannel = "order_service_status"

// ordersNotPending returns those of ids whose orders are PAID or FAILED: the
// event streams to wake after the LISTEN connection was down, one query for
// all of them.
func ordersNotPending(ctx context.Context, db dbtx, ids []string) ([]string, error) {
	rows, _ := db.Query(ctx, `SELECT id::text FROM orders WHERE id = ANY($1::uuid[]) AND status <> 'PENDING'`, ids)
	done, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("orders not pending: %w", err)
	}
	return done, nil
}

// orderStatuses tells duplicate results from ones for unknown orders.
func orderStatuses(ctx context.Context, db dbtx, ids []string) (map[string]string, error) {
	rows, _ := db.Query(ctx, `SELECT id::text, status FROM orders WHERE id = ANY($1::uuid[])`, ids)
	statuses := map[string]string{}
	var id, status string
	_, err := pgx.ForEachRow(rows, []any{&id, &status}, func() error {
		statuses[id] = status
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("order statuses: %w", err)
	}
	return statuses, nil
}

// utc keeps JSON times in one zone whatever the server's TimeZone setting is.
func (o Order) utc() Order {
	o.CreatedAt = o.CreatedAt.UTC()
	o.UpdatedAt = o.UpdatedAt.UTC()
	return o
}

// databaseGauges are what /metrics reads from the database at scrape time.
type databaseGauges struct {
	Backlog         int64   // outbox rows waiting
	OldestAgeSecond float64 // of the oldest of them, 0 when none
	DeadRows        int64   // outbox rows deleted and not yet removed by vacuum (an estimate)
	Horizon         map[string]horizonHolder
}

// horizonHolder is the oldest holder of vacuum's xmin horizon of one kind
// (horizonKinds): how many transactions old the xmin it holds is, and, where
// the database tells, how many seconds ago its transaction began.
type horizonHolder struct {
	Transactions int64
	Seconds      *float64
}

// horizonKinds are the kinds of things that hold vacuum's xmin horizon: a
// session's snapshot or transaction id (in this database, or a walsender's
// for a standby's queries, hot_standby_feedback), a replication slot's xmin
// (a standby's, through its slot), a slot's catalog_xmin (logical decoding;
// it holds back the system catalogs only), a prepared transaction.
var horizonKinds = []string{"session", "replication_slot", "replication_slot_catalog", "prepared_transaction"}

// getDatabaseGauges reads the gauges in one round trip.
func getDatabaseGauges(ctx context.Context, db *pgxpool.Pool, floor outboxFloor) (databaseGauges, error) {
	g := databaseGauges{Horizon: map[string]horizonHolder{}}
	b := &pgx.Batch{}
	b.BeginTx(pgx.TxOptions{AccessMode: pgx.ReadOnly})
	queuePlannerOff(b, claimPlan...)
	queueOutboxGauges(b, floor, &g)
	queueHorizonGauges(b, &g)
	if _, err := sendTx(ctx, db, b); err != nil {
		return g, fmt.Errorf("database gauges: %w", err)
	}
	return g, nil
}

// queueOutboxGauges queues the statement that reads the backlog, from floor
// on (see outboxFloor): what waits, and never the index entries of what was
// published, whatever vacuum can do; and the dead rows, read by the function
// behind pg_stat_user_tables.n_dead_tup so that no catalog join, planned by
// the catalogs' own statistics, enters the plan. Plan it with claimPlan.
func queueOutboxGauges(b *pgx.Batch, floor outboxFloor, g *databaseGauges) {
	b.Queue(`
		SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8,
		       pg_stat_get_dead_tuples('outbox'::regclass)
		FROM (SELECT created_at FROM outbox WHERE (transaction_id, id) >= ($1, $2)
		      UNION ALL
		      SELECT created_at FROM outbox WHERE transaction_id = ANY($3)) AS waiting`,
		floor.XID, floor.ID, floor.Pending,
	).QueryRow(func(row pgx.Row) error {
		return row.Scan(&g.Backlog, &g.OldestAgeSecond, &g.DeadRows)
	})
}

// queueHorizonGauges queues the statement that finds the oldest holder of
// vacuum's horizon of each kind. Every source it reads is bounded by the
// server's settings (max_connections, slots, prepared transactions), not by
// any table.
func queueHorizonGauges(b *pgx.Batch, g *databaseGauges) {
	b.Queue(`
		SELECT kind, max(transactions), max(seconds)
		FROM (SELECT 'session' AS kind, greatest(age(backend_xmin), age(backend_xid)) AS transactions,
		             extract(epoch FROM now() - xact_start)::float8 AS seconds
		      FROM pg_stat_activity
		      WHERE (datname = current_database() OR datname IS NULL) AND pid <> pg_backend_pid()
		        AND backend_type IS DISTINCT FROM 'autovacuum worker'
		        AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
		      UNION ALL
		      SELECT 'replication_slot', age(xmin), NULL FROM pg_replication_slots WHERE xmin IS NOT NULL
		      UNION ALL
		      SELECT 'replication_slot_catalog', age(catalog_xmin), NULL FROM pg_replication_slots WHERE catalog_xmin IS NOT NULL
		      UNION ALL
		      SELECT 'prepared_transaction', age(transaction), extract(epoch FROM now() - prepared)::float8
		      FROM pg_prepared_xacts WHERE database = current_database()) AS holders
		GROUP BY kind`,
	).Query(func(rows pgx.Rows) error {
		var kind string
		var h horizonHolder
		_, err := pgx.ForEachRow(rows, []any{&kind, &h.Transactions, &h.Seconds}, func() error {
			g.Horizon[kind] = h
			return nil
		})
		return err
	})
}

// batchSender is what both *pgxpool.Pool and *pgxpool.Conn offer.
type batchSender interface {
	SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults
}

// sendTx sends b, a transaction that BeginTx opened, and COMMIT, as one round
// trip. It reports whether the server answered the COMMIT: then the
// transaction committed, whatever followed (err may still say that the
// connection ended after it). Should a statement fail, the server skips the
// rest, COMMIT included, and the deferred rollback ends the transaction.
func sendTx(ctx context.Context, db batchSender, b *pgx.Batch) (committed bool, err error) {
	b.Queue(`COMMIT`).Exec(func(tag pgconn.CommandTag) error {
		committed = tag.String() == "COMMIT"
		return nil
	})
	br := db.SendBatch(ctx, b)
	defer br.Tx().Rollback(ctx) //nolint:errcheck // a no-op after COMMIT
	err = br.Close()
	return committed, err
}

// demoPayment is the demo Payment Service's decision on one pay-order
// event (embedded.go).
type demoPayment struct {
	EventID, OrderID string
	Status           string  // PAID or FAILED
	Reason           *string // with FAILED
	Repeated         bool    // the event was handled before: this is the decision stored then
}

// createDemoInbox creates the demo Payment Service's inbox, where it keeps
// the event ids it has handled and what it decided for each: the dedupe a
// Payment Service owes pay-order's at-least-once delivery (docs/api.md).
// It is the demo's table, not the Order Service's, and exists only where
// the demo has run.
func createDemoInbox(ctx context.Context, db *pgxpool.Pool) error {
	_, err := db.Exec(ctx, `
		CREATE TABLE IF NOT EXISTS demo_payment_inbox (
		    event_id   uuid PRIMARY KEY,
		    order_id   uuid NOT NULL,
		    status     text NOT NULL,
		    reason     text,
		    handled_at timestamptz NOT NULL DEFAULT now()
		);
		CREATE INDEX IF NOT EXISTS demo_payment_inbox_handled_at ON demo_payment_inbox (handled_at)`)
	if err != nil {
		return fmt.Errorf("create demo payment inbox: %w", err)
	}
	return nil
}

// recordDemoPayments stores the decision of each event not handled before
// and returns, for every event in order, the decision in force: its own, or
// the one stored when the event first came. ids must be distinct. One
// statement, so the inbox row and the decision it returns commit together;
// a Payment Service that moves money charges in the same transaction.
func recordDemoPayments(ctx context.Context, db *pgxpool.Pool, ps []demoPayment) ([]demoPayment, error) {
	n := len(ps)
	events, orders, statuses, reasons := make([]string, n), make([]string, n), make([]string, n), make([]*string, n)
	for i, p := range ps {
		events[i], orders[i], statuses[i], reasons[i] = p.EventID, p.OrderID, p.Status, p.Reason
	}
	rows, _ := db.Query(ctx, `
		WITH input AS (
		    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[]) WITH ORDINALITY
		        AS i(event_id, order_id, status, reason, n)),
		added AS (
		    INSERT INTO demo_payment_inbox (event_id, order_id, status, reason)
		    SELECT event_id, order_id, status, reason FROM input
		    ON CONFLICT (event_id) DO NOTHING)
		SELECT i.event_id::text, i.order_id::text, coalesce(d.status, i.status),
		       CASE WHEN d.event_id IS NULL THEN i.reason ELSE d.reason END, d.event_id IS NOT NULL
		FROM input i LEFT JOIN demo_payment_inbox d ON d.event_id = i.event_id
		ORDER BY i.n`,
		events, orders, statuses, reasons)
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (demoPayment, error) {
		var p demoPayment
		err := row.Scan(&p.EventID, &p.OrderID, &p.Status, &p.Reason, &p.Repeated)
		return p, err
	})
	if err != nil {
		return nil, fmt.Errorf("record demo payments: %w", err)
	}
	return out, nil
}

// purgeDemoInbox deletes what the demo's inbox has kept for longer than
// keep: an event that old is past pay-order's retention and cannot be
// redelivered. The index on handled_at makes it read only what it deletes.
func purgeDemoInbox(ctx context.Context, db *pgxpool.Pool, keep time.Duration) (int64, error) {
	tag, err := db.Exec(ctx, `DELETE FROM demo_payment_inbox WHERE handled_at < now() - $1::interval`, keep)
	if err != nil {
		return 0, fmt.Errorf("purge demo payment inbox: %w", err)
	}
	return tag.RowsAffected(), nil
}
