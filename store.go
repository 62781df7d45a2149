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
// When the pipeline was sent but its answer did not come back (the
// connection broke, or ctx ended while the server was still at work), the
// outcome is unknown to us: the error is a *commitUnknownError naming the
// server process that holds the transaction, so that the caller can end that
// process and then look for the orders (orderWriter.settle).
func createOrders(ctx context.Context, db *pgxpool.Pool, topic string, in []newOrder) ([]createResult, error) {
	conn, err := db.Acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("write orders: %w", err)
	}
	defer conn.Release()
	b := &pgx.Batch{}
	b.BeginTx(pgx.TxOptions{})
	inserted := queueInsertOrders(b, topic, in)
	b.Queue(`COMMIT`)
	br := conn.SendBatch(ctx, b)
	tx := br.Tx()
	defer tx.Rollback(ctx) //nolint:errcheck // a no-op once COMMIT ended the transaction
	if err := br.Close(); err != nil {
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) && !pgconn.SafeToRetry(err) {
			return nil, &commitUnknownError{pid: serverPID(conn.Conn().PgConn()), err: err}
		}
		return nil, fmt.Errorf("write orders: %w", err)
	}
	return orderAnswers(ctx, conn, in, inserted, true), nil
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
		case errors.Is(err, pgx.ErrNoRows) && !committed:
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

// errNotWritten: the transaction of a commit whose answer was lost did not
// store this order; a retry is safe.
var errNotWritten = errors.New("the order was not stored: its transaction rolled back")

// commitUnknownError is a pipeline whose answer was lost: the server process
// pid may have committed its transaction, may yet, or may not.
type commitUnknownError struct {
	pid uint32
	err error
}

func (e *commitUnknownError) Error() string {
	return fmt.Sprintf("orders' commit unanswered by server process %d: %v", e.pid, e.err)
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

// backendPID asks the server which process serves this connection.
func backendPID(ctx context.Context, db dbtx) (uint32, error) {
	var pid int32
	if err := db.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid); err != nil {
		return 0, fmt.Errorf("server process id: %w", err)
	}
	return uint32(pid), nil
}

// endBackend ends the server process pid, if it is still there, and waits
// for it to exit, for at most wait: then its transaction is over, committed or
// rolled back, and will not change. It reports whether the process is gone.
// Only a process of this service's own role is ended: should pid have been
// reused since, the new process is one of ours, and what ending it costs is
// one connection, never a wrong answer.
func endBackend(ctx context.Context, db dbtx, pid uint32, wait time.Duration) (bool, error) {
	var ended *bool
	err := db.QueryRow(ctx, `
		SELECT pg_terminate_backend(pid, $2)
		FROM pg_stat_activity
		WHERE pid = $1 AND usename = current_user AND pid <> pg_backend_pid()`,
		int64(pid), wait.Milliseconds()).Scan(&ended)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return true, nil
	case err != nil:
		return false, fmt.Errorf("end server process %d: %w", pid, err)
	}
	return ended != nil && *ended, nil
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
	if errors.Is(err, pgx.ErrNoRows) {
		return Order{}, errNotFound
	}
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
	ID          int64      `db:"id"`
	Topic       string     `db:"topic"`
	Key         string     `db:"key"`
	EventID     string     `db:"event_id"`
	Payload     []byte     `db:"payload"`
	Traceparent *string    `db:"traceparent"`
	Tracestate  *string    `db:"tracestate"`
	CreatedAt   time.Time  `db:"created_at"`
	LeaseUntil  *time.Time `db:"lease_until"` // the claim's, to release only its own rows
}

// queuePlannerOff queues the statement that plans the rest of the
// transaction with the given plan types switched off ("enable_sort",
// "enable_seqscan"). They are settings of the planner's costs, not
// prohibitions (a plan that needs one is still found), and they end with the
// transaction.
//
// The relay and the consumer need them because the planner's choice depends
// on statistics that a new or just-grown table does not have, and because a
// generic plan, which PostgreSQL caches after a statement's fifth run on a
// connection, stays as it was made until the next ANALYZE:
//
//   - The relay's claim must walk the partial index of unpublished rows in id
//     order and stop after limit rows, however many wait. Where the planner
//     believes the backlog small (a table never analyzed, or analyzed before
//     an outage), it prefers to read every unpublished row and sort them, at
//     every claim of the drain. No ordered plan but the index scan needs no
//     sort. The relay turns off sorts and sequential scans; its delete of
//     the published rows by id turns off sequential scans, which a plan
//     cached while the table was nearly empty would keep as it grew.
//   - The consumer's UPDATE of orders by id, cached while orders was small,
//     becomes a hash join over a sequential scan of every order, where the
//     primary key reads one row per result. The consumer turns off
//     sequential scans.
//
// docs/design.md has the measurements.
func queuePlannerOff(b *pgx.Batch, settings ...string) {
	b.Queue(`SELECT set_config(name, 'off', true) FROM unnest($1::text[]) AS name`, settings)
}

// queueClaimOutbox queues the statement that claims up to limit unpublished
// rows, in id order, for lease: it stamps them with lease_until and returns
// them; once the batch is read, *claimed holds them. The claim commits at once
// and the rows are published outside any transaction: no transaction stays
// open while the broker is asked, and vacuum's horizon never waits for it.
// Until the lease ends, other claims pass the rows by; a relay that dies
// holding them leaves them to be claimed again when it does.
//
// FOR UPDATE SKIP LOCKED lets several relays (and a relay's workers) claim
// side by side: each takes rows no other claim is stamping at that moment.
// Plan it after queuePlannerOff.
func queueClaimOutbox(b *pgx.Batch, limit int, lease time.Duration) (claimed *[]outboxRow) {
	claimed = new([]outboxRow)
	b.Queue(`
		UPDATE outbox SET lease_until = now() + $2::interval
		WHERE id IN (
		    SELECT id FROM outbox
		    WHERE published_at IS NULL AND (lease_until IS NULL OR lease_until < now())
		    ORDER BY id
		    LIMIT $1
		    FOR UPDATE SKIP LOCKED)
		RETURNING id, topic, key, event_id, payload, traceparent, tracestate, created_at, lease_until`,
		limit, lease,
	).Query(func(rows pgx.Rows) error {
		var err error
		if *claimed, err = pgx.CollectRows(rows, pgx.RowToStructByName[outboxRow]); err != nil {
			return fmt.Errorf("claim outbox: %w", err)
		}
		slices.SortFunc(*claimed, func(a, b outboxRow) int { return cmp.Compare(a.ID, b.ID) })
		return nil
	})
	return claimed
}

// queueDeletePublished queues the statement that deletes the rows whose
// events the broker acknowledged. The outbox is a queue and Kafka the log: a
// published event has nothing left to do here, so the table holds only what
// waits, and nothing the service reads grows with its history. Each row is
// written twice after its insert (the lease, the delete), where marking it
// published and purging it later wrote it three times.
func queueDeletePublished(b *pgx.Batch, ids []int64) {
	b.Queue(`DELETE FROM outbox WHERE id = ANY($1::bigint[])`, ids)
}

// queueReleaseClaims queues the statement that gives back claimed rows whose
// produce failed, so that the next claim retries them at once rather than
// when their lease ends; a row another relay has claimed since is not its to
// release.
func queueReleaseClaims(b *pgx.Batch, ids []int64, leaseUntil time.Time) {
	b.Queue(`UPDATE outbox SET lease_until = NULL WHERE id = ANY($1::bigint[]) AND lease_until = $2`, ids, leaseUntil)
}

// queueDeleteFormerlyPublished queues the statement that deletes at most
// limit rows that a former version of the service marked published and left
// for a purge by age; once the batch is read, *deleted holds how many. It
// walks the primary key, where those rows are the oldest.
func queueDeleteFormerlyPublished(b *pgx.Batch, limit int) (deleted *int64) {
	deleted = new(int64)
	b.Queue(`
		DELETE FROM outbox
		WHERE id IN (SELECT id FROM outbox WHERE published_at IS NOT NULL ORDER BY id LIMIT $1)`, limit).
		Exec(func(tag pgconn.CommandTag) error {
			*deleted = tag.RowsAffected()
			return nil
		})
	return deleted
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
	var done []string
	// BEGIN, the planner's settings and the UPDATE go in one round trip.
	b := &pgx.Batch{}
	b.BeginTx(pgx.TxOptions{})
	queuePlannerOff(b, "enable_seqscan")
	b.Queue(`
		UPDATE orders o
		SET status = r.status, failure_reason = r.reason, updated_at = now()
		FROM unnest($1::uuid[], $2::text[], $3::text[]) AS r(id, status, reason)
		WHERE o.id = r.id AND o.status = 'PENDING'
		RETURNING o.id::text, o.created_at`,
		ids, statuses, reasons,
	).Query(func(rows pgx.Rows) error {
		var id string
		var created time.Time
		_, err := pgx.ForEachRow(rows, []any{&id, &created}, func() error {
			done = append(done, id)
			changed[id] = created
			return nil
		})
		return err
	})
	br := db.SendBatch(ctx, b)
	tx := br.Tx()
	defer tx.Rollback(ctx) //nolint:errcheck // a no-op after Commit
	if err := br.Close(); err != nil {
		return nil, fmt.Errorf("apply payment results: %w", err)
	}
	if err := notifyStatus(ctx, tx, done); err != nil {
		return nil, err
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, fmt.Errorf("apply payment results: commit: %w", err)
	}
	return changed, nil
}

func notifyStatus(ctx context.Context, db dbtx, orderIDs []string) error {
	if len(orderIDs) == 0 {
		return nil
	}
	_, err := db.Exec(ctx, `SELECT pg_notify($1, id) FROM unnest($2::text[]) AS id`, statusChannel, orderIDs)
	if err != nil {
		return fmt.Errorf("notify status: %w", err)
	}
	return nil
}

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

// getOutboxStats reads the backlog gauges for /metrics through the partial
// index of unpublished rows: the whole table, which holds only the backlog.
func getOutboxStats(ctx context.Context, db dbtx) (outboxStats, error) {
	var s outboxStats
	err := db.QueryRow(ctx, `
		SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
		FROM outbox
		WHERE published_at IS NULL`).Scan(&s.Backlog, &s.OldestAgeSecond)
	if err != nil {
		return s, fmt.Errorf("outbox stats: %w", err)
	}
	return s, nil
}
