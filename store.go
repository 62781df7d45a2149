package main

// store.go holds every SQL statement of the service, one function per
// statement, plus the one transaction that writes an order with its outbox row.

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

//go:embed schema.sql
var schemaSQL string

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
	ID            string    `json:"id" db:"id"`
	UserID        string    `json:"user_id" db:"user_id"`
	Amount        int64     `json:"amount" db:"amount"`
	Description   string    `json:"description" db:"description"`
	Status        string    `json:"status" db:"status"`
	FailureReason *string   `json:"failure_reason,omitempty" db:"failure_reason"`
	CreatedAt     time.Time `json:"created_at" db:"created_at"`
	UpdatedAt     time.Time `json:"updated_at" db:"updated_at"`
}

// applySchema runs schema.sql. Two replicas starting at once would race on
// CREATE ... IF NOT EXISTS (it is not atomic with respect to the catalog), so
// the transaction first takes an advisory lock.
func applySchema(ctx context.Context, db *pgxpool.Pool) error {
	return pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('order-service schema'))`); err != nil {
			return fmt.Errorf("lock schema: %w", err)
		}
		if _, err := tx.Exec(ctx, schemaSQL); err != nil {
			return fmt.Errorf("apply schema.sql: %w", err)
		}
		return nil
	})
}

// newOrder is what a POST /orders asks for.
type newOrder struct {
	ID             string
	UserID         string
	Amount         int64
	Description    string
	IdempotencyKey *string
	RequestHash    []byte
}

// createOrder is the transactional outbox: the order row and the event that
// announces it commit together or not at all, and the NOTIFY that wakes the
// relay is delivered only on that commit. created reports whether this call
// inserted the order (false: an idempotent replay of an earlier request).
func createOrder(ctx context.Context, db *pgxpool.Pool, topic string, in newOrder) (order Order, created bool, err error) {
	err = pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		order, err = insertOrder(ctx, tx, in)
		if errors.Is(err, pgx.ErrNoRows) && in.IdempotencyKey != nil {
			// ON CONFLICT DO NOTHING waited for the first request's
			// transaction; its order is visible to this next statement.
			var hash []byte
			order, hash, err = getOrderByIdempotencyKey(ctx, tx, in.UserID, *in.IdempotencyKey)
			if err != nil {
				return err
			}
			if string(hash) != string(in.RequestHash) {
				return errIdempotencyConflict
			}
			return nil
		}
		if err != nil {
			return err
		}
		created = true
		payload, err := payOrderPayload(newUUID(), order)
		if err != nil {
			return err
		}
		if err := insertOutbox(ctx, tx, topic, order.ID, payload); err != nil {
			return err
		}
		return notifyOutbox(ctx, tx)
	})
	return order, created, err
}

func insertOrder(ctx context.Context, db dbtx, in newOrder) (Order, error) {
	rows, _ := db.Query(ctx, `
		INSERT INTO orders (id, user_id, amount, description, idempotency_key, request_hash)
		VALUES ($1, $2, $3, $4, $5, $6)
		ON CONFLICT (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
		RETURNING id, user_id, amount, description, status, failure_reason, created_at, updated_at`,
		in.ID, in.UserID, in.Amount, in.Description, in.IdempotencyKey, in.RequestHash)
	o, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Order])
	if err != nil {
		return Order{}, fmt.Errorf("insert order: %w", err)
	}
	return o.utc(), nil
}

func getOrderByIdempotencyKey(ctx context.Context, db dbtx, userID, key string) (Order, []byte, error) {
	var hash []byte
	var o Order
	err := db.QueryRow(ctx, `
		SELECT id, user_id, amount, description, status, failure_reason, created_at, updated_at, request_hash
		FROM orders
		WHERE user_id = $1 AND idempotency_key = $2`,
		userID, key).Scan(&o.ID, &o.UserID, &o.Amount, &o.Description, &o.Status, &o.FailureReason,
		&o.CreatedAt, &o.UpdatedAt, &hash)
	if err != nil {
		return Order{}, nil, fmt.Errorf("get order by idempotency key: %w", err)
	}
	return o.utc(), hash, nil
}

func insertOutbox(ctx context.Context, db dbtx, topic, key string, e payOrderEvent) error {
	_, err := db.Exec(ctx, `
		INSERT INTO outbox (topic, key, event_id, payload)
		VALUES ($1, $2, $3, $4)`,
		topic, key, e.EventID, e.JSON)
	if err != nil {
		return fmt.Errorf("insert outbox: %w", err)
	}
	return nil
}

// notifyOutbox wakes the relays. PostgreSQL delivers it at commit and folds
// identical notifications of one transaction into one.
func notifyOutbox(ctx context.Context, db dbtx) error {
	if _, err := db.Exec(ctx, `SELECT pg_notify($1, '')`, outboxChannel); err != nil {
		return fmt.Errorf("notify outbox: %w", err)
	}
	return nil
}

// getOrder returns the order only to its owner: another user's order is
// errNotFound, so ids cannot be probed.
func getOrder(ctx context.Context, db dbtx, userID, id string) (Order, error) {
	rows, _ := db.Query(ctx, `
		SELECT id, user_id, amount, description, status, failure_reason, created_at, updated_at
		FROM orders
		WHERE id = $1 AND user_id = $2`,
		id, userID)
	o, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[Order])
	if errors.Is(err, pgx.ErrNoRows) {
		return Order{}, errNotFound
	}
	if err != nil {
		return Order{}, fmt.Errorf("get order: %w", err)
	}
	return o.utc(), nil
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
		SELECT id, user_id, amount, description, status, failure_reason, created_at, updated_at
		FROM orders
		WHERE user_id = $1 AND (created_at, id) < ($2, $3)
		ORDER BY created_at DESC, id DESC
		LIMIT $4`,
		userID, after.CreatedAt, after.ID, limit)
	orders, err := pgx.CollectRows(rows, pgx.RowToStructByName[Order])
	if err != nil {
		return nil, fmt.Errorf("list orders: %w", err)
	}
	for i := range orders {
		orders[i] = orders[i].utc()
	}
	return orders, nil
}

// outboxRow is one claimed event.
type outboxRow struct {
	ID      int64  `db:"id"`
	Topic   string `db:"topic"`
	Key     string `db:"key"`
	EventID string `db:"event_id"`
	Payload []byte `db:"payload"`
}

// claimOutbox locks up to limit unpublished rows. SKIP LOCKED lets several
// relays share the table: each takes rows no other transaction holds, and a
// crashed relay's locks vanish with its connection, so no row stays stuck.
func claimOutbox(ctx context.Context, tx pgx.Tx, limit int) ([]outboxRow, error) {
	rows, _ := tx.Query(ctx, `
		SELECT id, topic, key, event_id, payload
		FROM outbox
		WHERE published_at IS NULL
		ORDER BY id
		LIMIT $1
		FOR UPDATE SKIP LOCKED`,
		limit)
	claimed, err := pgx.CollectRows(rows, pgx.RowToStructByName[outboxRow])
	if err != nil {
		return nil, fmt.Errorf("claim outbox: %w", err)
	}
	return claimed, nil
}

func markPublished(ctx context.Context, tx pgx.Tx, ids []int64) error {
	_, err := tx.Exec(ctx, `
		UPDATE outbox SET published_at = now()
		WHERE id = ANY($1)`,
		ids)
	if err != nil {
		return fmt.Errorf("mark outbox published: %w", err)
	}
	return nil
}

// purgePublished deletes at most limit published rows older than retention;
// small batches keep each delete short next to the relay's claims.
func purgePublished(ctx context.Context, db dbtx, retention time.Duration, limit int) (int64, error) {
	tag, err := db.Exec(ctx, `
		DELETE FROM outbox
		WHERE id IN (
			SELECT id FROM outbox
			WHERE published_at < now() - $1::interval
			ORDER BY id
			LIMIT $2
		)`,
		retention, limit)
	if err != nil {
		return 0, fmt.Errorf("purge outbox: %w", err)
	}
	return tag.RowsAffected(), nil
}

// applyPaymentResult moves a PENDING order to PAID or FAILED. The status in
// the WHERE clause is what makes the consumer idempotent: a redelivered or
// conflicting result matches no row and changes nothing. The NOTIFY, part of
// the same statement, reaches every replica's status listeners at commit.
func applyPaymentResult(ctx context.Context, db dbtx, orderID, status string, reason *string) (bool, error) {
	rows, _ := db.Query(ctx, `
		WITH changed AS (
			UPDATE orders
			SET status = $2, failure_reason = $3, updated_at = now()
			WHERE id = $1 AND status = 'PENDING'
			RETURNING id
		)
		SELECT pg_notify($4, id::text) FROM changed`,
		orderID, status, reason, statusChannel)
	n := 0
	for rows.Next() {
		n++
	}
	if err := rows.Err(); err != nil {
		return false, fmt.Errorf("apply payment result: %w", err)
	}
	return n == 1, nil
}

// orderStatus tells a duplicate result from one for an unknown order.
func orderStatus(ctx context.Context, db dbtx, orderID string) (string, error) {
	var status string
	err := db.QueryRow(ctx, `SELECT status FROM orders WHERE id = $1`, orderID).Scan(&status)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", errNotFound
	}
	if err != nil {
		return "", fmt.Errorf("order status: %w", err)
	}
	return status, nil
}

// utc keeps JSON times in one zone whatever the server's TimeZone setting is.
func (o Order) utc() Order {
	o.CreatedAt = o.CreatedAt.UTC()
	o.UpdatedAt = o.UpdatedAt.UTC()
	return o
}

// getOutboxStats reads the backlog gauges for /metrics through the partial
// index of unpublished rows.
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
