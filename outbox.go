package main

// outbox.go is the relay: it moves committed outbox rows to Kafka.

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"
)

type relay struct {
	db    *pgxpool.Pool
	kafka *kgo.Client
	log   *slog.Logger

	batchSize      int
	workers        int           // publishBatch loops side by side in a backlog
	pollInterval   time.Duration // fallback when a NOTIFY is lost
	produceTimeout time.Duration // bounds how long a batch waits for the broker
	metrics        *metrics
	floor          *claimFloor // where the claims begin, shared by the workers

	wake <-chan struct{} // new outbox rows announced, or the listener reconnected
}

// run publishes until ctx is cancelled, then returns after the batches in
// flight have been published and deleted, or given up when abort ends first
// (shutdown's budget is spent): their rows stay in the outbox for the next
// claim.
//
// One worker waits for new rows and backs off when publishing fails. It
// calls the others in only for a backlog, when it took a full batch: then
// they claim batches side by side, each skipping the rows the others have
// claimed, one producing while another is in the database.
func (r *relay) run(ctx, abort context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	help := make(chan struct{}, 1)
	for range r.workers - 1 {
		wg.Go(func() { r.assist(ctx, abort, help) })
	}
	var failures int
	for ctx.Err() == nil {
		n, err := r.publishBatch(abort)
		if err != nil {
			failures++
			d := backoff(failures)
			r.metrics.publishErrors.Add(1) // before the log line: a reader of the line finds it counted
			r.log.WarnContext(ctx, "relay: publish failed, retrying", "err", err, "retry_in", d)
			if r.pause(ctx, d, brokerUnavailable(err)) {
				failures = 0 // a new start: the broker is back
			}
			continue
		}
		failures = 0
		if n == r.batchSize {
			askHelp(help)
			continue // a full batch: more are likely waiting
		}
		select {
		case <-ctx.Done():
		case <-r.wake:
		case <-time.After(jitter(r.pollInterval)):
		}
	}
}

// assist is one of the other workers: asked for help, it publishes batches
// while they come full, then waits to be asked again. It never retries: a
// failure is the first worker's to back off from, and new rows its to see.
func (r *relay) assist(ctx, abort context.Context, help chan struct{}) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-help:
		}
		for ctx.Err() == nil {
			n, err := r.publishBatch(abort)
			if err != nil {
				r.metrics.publishErrors.Add(1)
				r.log.WarnContext(ctx, "relay: publish failed, leaving the rest to the first worker", "err", err)
				break
			}
			if n < r.batchSize {
				break
			}
			askHelp(help)
		}
	}
}

// askHelp wakes an idle worker, if one is waiting to be asked.
func askHelp(help chan struct{}) {
	select {
	case help <- struct{}{}:
	default:
	}
}

// newProducerClient is the relay's producer (the consumer's DLQ copies use it
// too).
func newProducerClient(brokers []string) (*kgo.Client, error) {
	return kgo.NewClient(
		kgo.SeedBrokers(brokers...),
		kgo.ClientID("order-service"),
		kgo.WithHooks(noteProduceEnd{}),
		// acks=all and idempotent writes are kgo's defaults. This lets the
		// relay's deadline fail even in-flight records, so a stalled
		// broker cannot hold outbox row locks forever; the price is a
		// possible duplicate, which at-least-once delivery allows anyway.
		kgo.AllowIdempotentProduceCancellation(),
		// While brokers are unreachable kgo fails a record only after a
		// metadata refresh, and by default refreshes at most every 5s
		// with backoff up to 2.5s between tries: the produce deadline
		// would be overrun by seconds, and a returned cluster noticed as
		// late. Refreshing at most four times a second and retrying
		// within 250ms costs a few requests a second, only while
		// something is failing.
		kgo.MetadataMinAge(250*time.Millisecond),
		kgo.RetryBackoffFn(func(tries int) time.Duration {
			return jitter(min(250*time.Millisecond, 25*time.Millisecond<<min(tries, 4)))
		}),
	)
}

// publishBatch claims a batch, produces it and deletes what the broker
// acknowledged. Each of the two database steps is a transaction of one round
// trip; none is open while the broker is asked. ctx is not the run's ctx but
// its abort: shutdown lets the current batch finish if it can.
func (r *relay) publishBatch(ctx context.Context) (int, error) {
	// A claim is not cut short by shutdown: cut, it could leave its rows
	// leased, with nobody to publish them until the lease ends. It ends
	// (in milliseconds, unless the database is failing), and its rows are
	// given back below.
	claimed, err := r.claim(context.WithoutCancel(ctx))
	if err != nil || len(claimed) == 0 {
		return 0, err
	}
	// Delete what the broker acknowledged, even when some records failed:
	// a partition without a leader must not hold back the events of the
	// others. The failed rows are released for the next try; a failed
	// record that did reach the broker will be sent again: at least once.
	var acked []ackedRow
	var produceErr error
	if ctx.Err() == nil {
		acked, produceErr = r.produce(ctx, claimed)
	}
	if err := r.finish(ctx, claimed, acked); err != nil {
		// The rows stay claimed until their lease ends, then are
		// published again: at least once.
		return len(acked), err
	}
	return len(acked), produceErr
}

// leaseFor is how long a claim leases its rows: the claim, the produce and
// the delete each end within their deadline (dbStepTimeout, produceTimeout,
// dbStepTimeout) of the step before, so the whole batch ends within their sum
// of the moment before the claim. The database counts the lease from its
// claim transaction's start, which comes after that moment: no other relay
// can claim the rows while this one may still publish or delete them.
func leaseFor(produceTimeout time.Duration) time.Duration {
	return dbStepTimeout + produceTimeout + dbStepTimeout
}

// claim takes up to batchSize unpublished rows for leaseFor, from the floor,
// and moves the floor past what is gone, in one round trip: BEGIN, the
// planner's settings, the claim, the next floor, COMMIT.
func (r *relay) claim(ctx context.Context) ([]outboxRow, error) {
	ctx, cancel := context.WithTimeout(ctx, dbStepTimeout)
	defer cancel()
	floor := r.floor.get()
	b := &pgx.Batch{}
	b.BeginTx(pgx.TxOptions{})
	queuePlannerOff(b, claimPlan...)
	claim := queueClaimOutbox(b, floor, r.batchSize, leaseFor(r.produceTimeout))
	next := queueNextFloor(b, floor)
	if committed, err := sendTx(ctx, r.db, b); !committed {
		return nil, fmt.Errorf("claim: %w", err)
	}
	r.floor.set(*next)
	return *claim, nil
}

// claimFloor is the relay's memory of where the outbox rows still to publish
// begin (outboxFloor), kept by this process alone: each claim moves it, and
// a relay that starts begins at the start of the table. /metrics reads the
// backlog from it too.
type claimFloor struct {
	mu    sync.Mutex
	floor outboxFloor
}

func (c *claimFloor) get() outboxFloor {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.floor
}

// set keeps the higher of two floors. Each is true from the moment its
// snapshot was taken on, so either may stand; workers claiming side by side
// finish in any order.
func (c *claimFloor) set(f outboxFloor) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cmp.Or(cmp.Compare(f.XID, c.floor.XID), cmp.Compare(f.ID, c.floor.ID)) >= 0 {
		c.floor = f
	}
}

// dbStepTimeout bounds each of the relay's transactions: one round trip each.
const dbStepTimeout = 5 * time.Second

// ackedRow is a claimed row whose record the broker acknowledged, at at.
type ackedRow struct {
	row outboxRow
	at  time.Time
}

// produce sends the claimed rows' records within the produce deadline and
// returns those the broker acknowledged, with the first failure of the
// others as a produceError.
func (r *relay) produce(ctx context.Context, claimed []outboxRow) ([]ackedRow, error) {
	ctx, cancel := context.WithTimeout(ctx, r.produceTimeout)
	defer cancel()
	// Each record's context holds where noteProduceEnd writes when its
	// produce ended: a batch ends with its slowest partition, which may
	// retry for seconds while the others were written at once.
	ended := make([]time.Time, len(claimed))
	recs := make([]*kgo.Record, len(claimed))
	index := make(map[*kgo.Record]int, len(recs)) // results come in completion order
	for i, row := range claimed {
		recs[i] = eventRecord(context.WithValue(ctx, produceEndKey{}, &ended[i]), row)
		index[recs[i]] = i
	}
	// ProduceSync, not a loop of Produce: it sends what it was given at
	// once, where Produce would wait out the client's linger (10ms).
	var acked []ackedRow
	var failed error
	for _, res := range r.kafka.ProduceSync(ctx, recs...) {
		if res.Err != nil {
			failed = cmp.Or(failed, res.Err)
			continue
		}
		i := index[res.Record]
		acked = append(acked, ackedRow{row: claimed[i], at: ended[i]})
	}
	if failed != nil {
		return acked, fmt.Errorf("produce %d of %d records: %w", len(recs)-len(acked), len(recs), produceError{failed})
	}
	return acked, nil
}

// eventRecord is the Kafka record of an outbox row. Its timestamp is left
// to the client (now): a backlog published late must not inherit an age
// that the topic's retention would delete at once.
func eventRecord(ctx context.Context, row outboxRow) *kgo.Record {
	rec := &kgo.Record{
		Topic:   row.Topic,
		Key:     []byte(row.Key),
		Value:   row.Payload,
		Headers: []kgo.RecordHeader{{Key: "event-id", Value: []byte(row.EventID)}},
		Context: ctx,
	}
	if row.Traceparent != nil {
		rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: "traceparent", Value: []byte(*row.Traceparent)})
	}
	if row.Tracestate != nil {
		rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: "tracestate", Value: []byte(*row.Tracestate)})
	}
	return rec
}

// finish deletes the acknowledged rows and releases the others, in one
// round trip. It runs even when abort has ended (a batch abandoned at
// shutdown still gives its rows back at once), within its own deadline.
func (r *relay) finish(ctx context.Context, claimed []outboxRow, acked []ackedRow) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), dbStepTimeout)
	defer cancel()
	published := make(map[int64]bool, len(acked))
	done := make([]outboxRow, len(acked))
	for i, a := range acked {
		done[i], published[a.row.ID] = a.row, true
	}
	var failed []outboxRow
	for _, row := range claimed {
		if !published[row.ID] {
			failed = append(failed, row)
		}
	}
	b := &pgx.Batch{}
	b.BeginTx(pgx.TxOptions{})
	queuePlannerOff(b, finishPlan...)
	if len(done) > 0 {
		queueDeletePublished(b, done)
	}
	if len(failed) > 0 {
		queueReleaseClaims(b, failed, *claimed[0].LeaseUntil)
	}
	if committed, err := sendTx(ctx, r.db, b); !committed {
		return fmt.Errorf("delete published rows: %w", err)
	}
	r.metrics.eventsPublished.Add(int64(len(acked)))
	if len(acked) > 0 {
		r.metrics.relayBatch.observe(float64(len(acked)))
	}
	for _, a := range acked {
		// created_at is the order transaction's start, within
		// milliseconds of its commit.
		r.metrics.publishLatency.observe(a.at.Sub(a.row.CreatedAt).Seconds())
	}
	return nil
}

// produceEndKey keys, in a relay record's context, the *time.Time where
// noteProduceEnd writes when its produce ended. ProduceSync's results say
// how each ended; only the hook sees when.
type produceEndKey struct{}

// noteProduceEnd is the producer's kgo hook: kgo calls it just before a
// record's promise, as the broker's answer (or the deadline) ends that
// record, not when the last record of its batch ends.
type noteProduceEnd struct{}

func (noteProduceEnd) OnProduceRecordUnbuffered(rec *kgo.Record, _ error) {
	if at, ok := rec.Context.Value(produceEndKey{}).(*time.Time); ok {
		*at = time.Now()
	}
}

// pause waits d after a failed batch, but no longer than it takes a broker
// that stopped answering to answer again: the backlog of an outage leaves
// within a second of the cluster's return, not after the backoff. It asks
// every 200ms (an ApiVersions request). down says the failure was the
// broker's: then its first answer after the first step ends the pause, even
// if it answers all along (the cluster may have returned while the produce
// was failing, or a partition may be waiting for a leader: the next try
// waits for that, within its own deadline). The first step is kept so that
// a produce that fails at once is not retried in a tight loop. Otherwise
// (the database failed) only a broker seen down and then answering ends the
// pause early. back says the broker was seen to return.
func (r *relay) pause(ctx context.Context, d time.Duration, down bool) (back bool) {
	const every = 200 * time.Millisecond
	start := time.Now()
	until := start.Add(d)
	seenDown := false
	for ctx.Err() == nil {
		left := time.Until(until)
		if left <= 0 {
			return false
		}
		step := time.Now().Add(min(every, left))
		pctx, cancel := context.WithDeadline(ctx, step)
		err := r.kafka.Ping(pctx)
		cancel()
		switch {
		case err != nil:
			down, seenDown = true, true
		case seenDown:
			return true
		case down && time.Since(start) >= every:
			return false
		}
		sleep(ctx, time.Until(step))
	}
	return false
}
