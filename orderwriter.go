package main

// orderwriter.go writes orders: concurrent POST /orders share a commit. A commit waits for
// its WAL flush; while one transaction waits, requests that arrive queue up,
// and the next transaction takes them all. Under light load every batch holds
// one request and nothing waits for company. Under more than the writers can
// commit, the queue is full and what arrives is refused at once, so that the
// writers keep writing full batches of requests that still have time.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

type createRequest struct {
	ctx  context.Context
	in   newOrder
	done chan createResult
}

type orderWriter struct {
	db       *pgxpool.Pool
	topic    string
	maxBatch int
	queue    chan *createRequest // waiting for a writer, at most CREATE_QUEUE_MAX
	metrics  *metrics
	created  func() // after a commit that wrote outbox rows: wakes the relays
}

func newOrderWriter(db *pgxpool.Pool, topic string, maxBatch, queueMax int, m *metrics, created func()) *orderWriter {
	return &orderWriter{db: db, topic: topic, maxBatch: maxBatch, queue: make(chan *createRequest, queueMax),
		metrics: m, created: created}
}

// waiting is how many requests wait for a writer, and how many may.
func (w *orderWriter) waiting() (n, most int) { return len(w.queue), cap(w.queue) }

// errOverloaded: the request was refused unwritten, because more orders are
// arriving than the writers can commit. A retry after a moment is safe.
var errOverloaded = errors.New("more orders are arriving than can be written")

// minWriteTime is the least time a request must have left when a writer takes
// it: enough for its batch's commit with room to spare. A request with less
// has waited too long and is answered errOverloaded, so that it never makes
// the batch it would join end early.
const minWriteTime = requestDBTimeout / 5

// full says that a request would be refused now: the handler asks before it
// reads the body, so that refusing costs as little as it can.
func (w *orderWriter) full() bool {
	if len(w.queue) < cap(w.queue) {
		return false
	}
	w.metrics.ordersRefused[refusedQueueFull].Add(1)
	return true
}

// create writes one order, in a transaction it may share with others. When
// the queue is full it refuses the request at once (errOverloaded).
func (w *orderWriter) create(ctx context.Context, in newOrder) (createResult, error) {
	req := &createRequest{ctx: ctx, in: in, done: make(chan createResult, 1)}
	select {
	case w.queue <- req:
	default:
		w.metrics.ordersRefused[refusedQueueFull].Add(1)
		return createResult{}, errOverloaded
	}
	// A worker holds the request now and answers it, even past ctx's
	// deadline when it must settle a COMMIT whose answer was lost: an
	// order answered 503 must not exist, or a client retrying without an
	// Idempotency-Key would pay twice.
	res := <-req.done
	return res, res.Err
}

// run starts workers that each write one batch at a time, until ctx ends.
func (w *orderWriter) run(ctx context.Context, workers int) {
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				var batch []*createRequest
				select {
				case <-ctx.Done():
					return
				case r := <-w.queue:
					batch = append(batch, r)
				}
				// Take whoever is already waiting; never wait for more.
			fill:
				for len(batch) < w.maxBatch {
					select {
					case r := <-w.queue:
						batch = append(batch, r)
					default:
						break fill
					}
				}
				w.write(batch)
			}
		})
	}
	wg.Wait()
}

func (w *orderWriter) write(batch []*createRequest) {
	now := time.Now()
	live := slices.DeleteFunc(batch, func(r *createRequest) bool {
		switch d, ok := r.ctx.Deadline(); {
		case r.ctx.Err() != nil:
			r.done <- createResult{Err: r.ctx.Err()} // its caller gave up
			return true
		case ok && d.Sub(now) < minWriteTime:
			w.metrics.ordersRefused[refusedLate].Add(1)
			r.done <- createResult{Err: errOverloaded}
			return true
		}
		return false
	})
	if len(live) == 0 {
		return
	}
	// Lock idempotency keys in one global order: see queueInsertOrders.
	slices.SortFunc(live, func(a, b *createRequest) int {
		return cmp.Or(cmp.Compare(a.in.UserID, b.in.UserID), cmp.Compare(deref(a.in.IdempotencyKey), deref(b.in.IdempotencyKey)))
	})
	in := make([]newOrder, len(live))
	for i, r := range live {
		in[i] = r.in
	}
	// The transaction must end by the time the first of its callers stops
	// waiting: an order written after its request was answered 503 would
	// surprise the client that retries without an Idempotency-Key. Every
	// caller has minWriteTime left at least, so the batch has too.
	deadline := now.Add(requestDBTimeout)
	for _, r := range live {
		if d, ok := r.ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	results, err := createOrders(ctx, w.db, w.topic, in)
	var unknown *commitUnknownError
	if errors.As(err, &unknown) {
		w.metrics.commitsUnanswered.Add(1)
		results, err = w.settle(unknown, in)
	}
	var pgErr *pgconn.PgError
	if err != nil && len(live) > 1 && errors.As(err, &pgErr) && !dbTransient(err) {
		// A statement failed for the whole batch; it may be one row's
		// fault. Each request gets its own transaction, and its own error.
		for _, r := range live {
			w.write([]*createRequest{r})
		}
		return
	}
	w.metrics.orderBatches.Add(1)
	if err == nil && slices.ContainsFunc(results, func(r createResult) bool { return r.Created }) {
		w.created()
	}
	for i, r := range live {
		if err != nil {
			r.done <- createResult{Err: err}
			continue
		}
		r.done <- results[i]
	}
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// requestDBTimeout is how long a request may spend in the database, from its
// arrival: with settleTimeout after it, every answer comes within 5 s.
const requestDBTimeout = 2500 * time.Millisecond

// settleTimeout bounds how long a request waits, past its own deadline, to
// learn what became of a COMMIT whose answer was lost: with requestDBTimeout,
// the whole answer comes within 5s, for a client that waits no longer.
const settleTimeout = 2 * time.Second

// settle learns, on another connection, what became of a transaction whose
// answer was lost. First the server process that holds it must be gone:
// while it lives, a COMMIT already in its input may still run, after a lock
// wait for instance, and an order answered 503 would appear later. Once it is
// gone the transaction is over for good, and each request's order either
// exists, with the id it was given here, or does not (orderAnswers). Unlike
// asking about a transaction id, this needs nothing from the lost answer.
// Both steps run on one connection, checked to be the primary's
// (endBackend): a standby, where the pool may land with a multi-host
// DATABASE_URL that does not ask for a writable server, would say that the
// process is gone and the orders not written. The error is
// errCommitOutcomeUnknown if the database could not be asked.
func (w *orderWriter) settle(u *commitUnknownError, in []newOrder) ([]createResult, error) {
	ctx, cancel := context.WithTimeout(context.Background(), settleTimeout)
	defer cancel()
	ids := make([]string, len(in))
	for i, r := range in {
		ids[i] = r.ID
	}
	var results []createResult
	err := retry(ctx, func(ctx context.Context) error {
		conn, err := w.db.Acquire(ctx)
		if err != nil {
			return err
		}
		defer conn.Release()
		gone, err := endBackend(ctx, conn, u.proc, time.Second)
		switch {
		case errors.Is(err, errReadOnly):
			conn.Conn().Close(ctx) //nolint:errcheck // so that the pool connects anew
			return err
		case err != nil:
			return err
		case !gone:
			return errors.New("still running")
		}
		found, err := getOrdersByID(ctx, conn, ids)
		if err != nil {
			return err
		}
		results = orderAnswers(ctx, conn, in, found, false)
		return nil
	}, func(error, time.Duration) bool { return true })
	if err != nil {
		return nil, fmt.Errorf("%w (server process %d: %w): %w", errCommitOutcomeUnknown, u.proc.PID, err, u.err)
	}
	return results, nil
}
