package main

// outbox.go is the relay: it moves committed outbox rows to Kafka.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"
)

// payOrderEvent is a pay-order record as the outbox stores it.
type payOrderEvent struct {
	EventID string
	JSON    []byte
}

// payOrderPayload builds the pay-order value of the Kafka contract.
func payOrderPayload(eventID string, o Order) (payOrderEvent, error) {
	b, err := json.Marshal(struct {
		EventID   string    `json:"event_id"`
		OrderID   string    `json:"order_id"`
		UserID    string    `json:"user_id"`
		Amount    int64     `json:"amount"`
		CreatedAt time.Time `json:"created_at"`
	}{eventID, o.ID, o.UserID, o.Amount, o.CreatedAt})
	if err != nil {
		return payOrderEvent{}, fmt.Errorf("encode pay-order event: %w", err)
	}
	return payOrderEvent{EventID: eventID, JSON: b}, nil
}

type relay struct {
	db    *pgxpool.Pool
	kafka *kgo.Client
	log   *slog.Logger

	batchSize      int
	pollInterval   time.Duration // fallback when a NOTIFY is lost
	produceTimeout time.Duration // bounds how long a batch holds its row locks
	retention      time.Duration // published rows older than this are purged
	purgeInterval  time.Duration
	metrics        *metrics

	wake chan struct{}
}

const (
	purgeBatchSize = 1000
	maxBackoff     = 5 * time.Second
)

// run publishes until ctx is cancelled, then returns after the batch in
// flight has been published and marked (or rolled back).
func (r *relay) run(ctx context.Context) {
	r.wake = make(chan struct{}, 1)
	listenDone := make(chan struct{})
	go func() {
		defer close(listenDone)
		r.listen(ctx)
	}()
	defer func() { <-listenDone }()

	purgeDone := make(chan struct{})
	go func() {
		defer close(purgeDone)
		r.purgeLoop(ctx)
	}()
	defer func() { <-purgeDone }()

	var failures int
	for ctx.Err() == nil {
		n, err := r.publishBatch(ctx)
		if err != nil {
			failures++
			d := backoff(failures)
			r.log.WarnContext(ctx, "relay: publish failed, retrying", "err", err, "retry_in", d)
			r.metrics.publishErrors.Add(1)
			sleep(ctx, d)
			continue
		}
		failures = 0
		if n == r.batchSize {
			continue // a full batch: more are likely waiting
		}
		select {
		case <-ctx.Done():
		case <-r.wake:
		case <-time.After(jitter(r.pollInterval)):
		}
	}
}

// publishBatch claims, produces and marks one batch in one transaction. The
// transaction is not bound to ctx: shutdown lets the current batch finish, and
// the produce deadline alone bounds how long row locks are held.
func (r *relay) publishBatch(ctx context.Context) (int, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.produceTimeout+10*time.Second)
	defer cancel()

	tx, err := r.db.Begin(ctx)
	if err != nil {
		return 0, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // a no-op after Commit

	claimed, err := claimOutbox(ctx, tx, r.batchSize)
	if err != nil || len(claimed) == 0 {
		return 0, err
	}

	recs := make([]*kgo.Record, len(claimed))
	ids := make([]int64, len(claimed))
	for i, row := range claimed {
		ids[i] = row.ID
		// The record timestamp is left to the client (now): a backlog
		// published late must not inherit an age that retention would
		// delete at once.
		recs[i] = &kgo.Record{
			Topic:   row.Topic,
			Key:     []byte(row.Key),
			Value:   row.Payload,
			Headers: []kgo.RecordHeader{{Key: "event-id", Value: []byte(row.EventID)}},
		}
	}
	pctx, pcancel := context.WithTimeout(ctx, r.produceTimeout)
	err = r.kafka.ProduceSync(pctx, recs...).FirstErr()
	pcancel()
	if err != nil {
		// Rolling back releases the rows for the next try. Records of this
		// batch that did reach the broker will be sent again: at least once.
		return 0, fmt.Errorf("produce %d records: %w", len(recs), err)
	}
	// A crash from here to Commit repeats the batch on the next claim; the
	// consumer of pay-order dedupes on event_id.
	if err := markPublished(ctx, tx, ids); err != nil {
		return 0, err
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, fmt.Errorf("commit published batch: %w", err)
	}
	r.metrics.eventsPublished.Add(int64(len(claimed)))
	return len(claimed), nil
}

// purgeLoop deletes published rows past their retention, on its own timer so
// that neither a busy nor an idle relay delays it.
func (r *relay) purgeLoop(ctx context.Context) {
	t := time.NewTicker(r.purgeInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for ctx.Err() == nil {
			n, err := purgePublished(ctx, r.db, r.retention, purgeBatchSize)
			if err != nil {
				if ctx.Err() == nil {
					r.log.WarnContext(ctx, "relay: purge failed", "err", err)
				}
				break
			}
			if n < purgeBatchSize {
				break
			}
		}
	}
}

// listen holds one connection outside the pool, LISTENing for the NOTIFY sent
// by createOrder, and wakes the publish loop. Any failure reconnects with
// backoff; the poll in run covers notifications missed meanwhile.
func (r *relay) listen(ctx context.Context) {
	var failures int
	for ctx.Err() == nil {
		err := r.listenOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		failures++
		d := backoff(failures)
		r.log.WarnContext(ctx, "relay: listen connection lost, reconnecting", "err", err, "retry_in", d)
		sleep(ctx, d)
	}
}

func (r *relay) listenOnce(ctx context.Context) error {
	pc, err := r.db.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("acquire listen connection: %w", err)
	}
	// Hijacked, the connection is ours: the pool will neither hand it to
	// a request nor close it as idle.
	conn := pc.Hijack()
	defer conn.Close(context.WithoutCancel(ctx))

	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{outboxChannel}.Sanitize()); err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	r.poke() // rows committed while we were not listening
	for {
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := conn.WaitForNotification(wctx)
		cancel()
		switch {
		case err == nil:
			r.poke()
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, context.DeadlineExceeded):
			// Quiet for a while: make sure the connection still lives,
			// since a dead one would wait forever.
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err = conn.Ping(pctx)
			cancel()
			if err != nil {
				return fmt.Errorf("ping listen connection: %w", err)
			}
		default:
			return fmt.Errorf("wait for notification: %w", err)
		}
	}
}

// poke wakes the publish loop without blocking; one pending wake is enough.
func (r *relay) poke() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// backoff is capped exponential backoff with jitter: 100ms, 200ms, ... 5s.
func backoff(failures int) time.Duration {
	d := maxBackoff
	if failures < 7 {
		d = min(maxBackoff, 100*time.Millisecond<<(failures-1))
	}
	return jitter(d)
}

// jitter adds up to 10% so that replicas do not poll in lockstep.
func jitter(d time.Duration) time.Duration {
	return d + rand.N(d/10+1)
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
