// Command order-service is the Order Service of the online shop «Гоzон». It
// takes orders over HTTP, stores them in PostgreSQL, and talks to the Payment
// Service only through Kafka, using the transactional outbox pattern.
package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-healthcheck" {
		os.Exit(healthcheck(os.Getenv))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop() // from now on a second Ctrl-C kills at once
	}()
	if err := run(ctx, os.Getenv, os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "order-service: %v\n", err)
		os.Exit(1)
	}
}

// run is the whole program; main only adds the OS. Tests call it with their
// own environment and cancel ctx to shut it down.
func run(ctx context.Context, getenv func(string) string, stdout io.Writer) error {
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	log := newLogger(cfg, stdout)
	// stopBy is when shutdown must be over: zero until it begins. The
	// deferred closes wait for nothing past it (closeBefore).
	var stopBy time.Time
	db, err := connectDB(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer closeBefore(&stopBy, db.Close)
	if err := applySchema(ctx, db); err != nil {
		return err
	}
	brokers := cfg.KafkaBrokers
	if len(brokers) == 0 {
		kf, err := startEmbeddedKafka(cfg.EmbeddedKafkaAddr, cfg.EmbeddedKafkaDir)
		if err != nil {
			return fmt.Errorf("%w (is another order-service running? set EMBEDDED_KAFKA_ADDR or KAFKA_BROKERS)", err)
		}
		defer closeBefore(&stopBy, kf.Close)
		brokers = kf.ListenAddrs()
		log.Info("embedded kafka started", "addr", brokers[0], "data_dir", cfg.EmbeddedKafkaDir)
	}
	producer, err := newProducerClient(brokers)
	if err != nil {
		return fmt.Errorf("kafka producer: %w", err)
	}
	defer closeBefore(&stopBy, producer.Close)
	m := newMetrics()
	c, err := newConsumer(brokers, cfg, log, db, producer, m)
	if err != nil {
		return fmt.Errorf("kafka consumer: %w", err)
	}
	if cfg.PprofAddr != "" {
		defer servePprof(cfg.PprofAddr, log)()
	}
	tcp, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		c.group.Close()
		return fmt.Errorf("listen: %w", err)
	}
	maxConns, maxStreams := fdLimits(cfg.StreamsMax)
	if maxStreams < cfg.StreamsMax {
		log.Warn("fewer event streams than STREAMS_MAX: streams take at most half the connections "+
			"the process's file descriptors allow", "streams_max", maxStreams, "connections_max", maxConns)
	}
	ln := newLimitListener(tcp, maxConns)

	p := start(ctx, cfg, log, db, brokers, producer, c, m, ln, maxStreams)
	log.Info("http server listening", "addr", ln.Addr().String())
	srvErr := make(chan error, 1)
	go func() { srvErr <- p.srv.Serve(ln) }()
	select {
	case <-ctx.Done():
		err = nil
	case err = <-srvErr:
		err = fmt.Errorf("http server: %w", err)
	}
	stopBy = time.Now().Add(cfg.ShutdownTimeout)
	p.shutdown(stopBy)
	return err
}

// newLogger writes LOG_FORMAT lines at LOG_LEVEL to out, each with the
// trace_id and request_id of its context, repeated failures once per
// interval (quietHandler).
func newLogger(cfg config, out io.Writer) *slog.Logger {
	var handler slog.Handler = slog.NewTextHandler(out, &slog.HandlerOptions{Level: cfg.LogLevel})
	if cfg.LogJSON {
		handler = slog.NewJSONHandler(out, &slog.HandlerOptions{Level: cfg.LogLevel})
	}
	return slog.New(contextHandler{newQuietHandler(handler)})
}

// program is the running service: its HTTP server and its workers.
type program struct {
	cfg             config
	log             *slog.Logger
	srv             *http.Server
	producer, group *kgo.Client
	workers         sync.WaitGroup
	stopWork        context.CancelFunc // asks the workers to finish
	abort           context.CancelFunc // makes them abandon what is in flight
}

// start wires the service's parts and starts its workers; the server is
// returned ready to serve.
func start(ctx context.Context, cfg config, log *slog.Logger, db *pgxpool.Pool, brokers []string,
	producer *kgo.Client, c *consumer, m *metrics, conns *limitListener, maxStreams int) *program {
	p := &program{cfg: cfg, log: log, producer: producer, group: c.group}
	// Workers outlive ctx: they are stopped in order during shutdown.
	workCtx, stopWork := context.WithCancel(context.WithoutCancel(ctx))
	// abortCtx ends when shutdown's budget is nearly spent: work still in
	// flight then is abandoned, which is safe to redo (see shutdown).
	abortCtx, abort := context.WithCancel(context.WithoutCancel(ctx))
	p.stopWork, p.abort = stopWork, abort
	wg := &p.workers
	wg.Go(func() {
		ensureTopics(workCtx, producer, log, cfg.TopicPartitions,
			cfg.topic(topicPayOrder), cfg.topic(topicPaymentResults), cfg.topic(topicPaymentDLQ))
	})
	notes := newNotifier(db, log, func(ctx context.Context, _ string, orderIDs []string) ([]string, error) {
		return ordersNotPending(ctx, db, orderIDs) // only the event streams subscribe to one payload
	}, outboxChannel, statusChannel)
	wg.Go(func() { notes.run(workCtx) })
	orders := newOrderWriter(db, cfg.topic(topicPayOrder), cfg.CreateBatchMax, cfg.CreateQueueMax, m,
		func() { notes.announce(outboxChannel) })
	// Few writers make big batches: while one waits for its commit, the
	// requests arriving meanwhile gather for the next one.
	wg.Go(func() { orders.run(workCtx, cfg.CreateWriters) })
	wake, _ := notes.subscribe(outboxChannel, "")
	floor := &claimFloor{}
	r := &relay{db: db, kafka: producer, log: log, metrics: m, wake: wake, batchSize: cfg.RelayBatchSize,
		workers: cfg.RelayWorkers, pollInterval: cfg.RelayPollInterval, produceTimeout: cfg.ProduceTimeout, floor: floor}
	wg.Go(func() { r.run(workCtx, abortCtx) })
	wg.Go(func() { c.run(workCtx, abortCtx) })
	wg.Go(func() {
		session := setGroupSession(workCtx, c.group, log, cfg.topic(consumerGroup), cfg.GroupProtocol, cfg.SessionTimeout)
		m.groupSession.Store(int64(session))
		if session > 0 {
			log.Info("consumer group session", "group", cfg.topic(consumerGroup), "session", session)
		}
	})
	if cfg.DemoPayments {
		log.Info("demo payments on: orders up to the limit are PAID, larger ones FAILED", "limit", demoPaymentLimit)
		wg.Go(func() {
			if err := demoPayments(workCtx, db, brokers, cfg.topic(topicPayOrder), cfg.topic(topicPaymentResults),
				cfg.topic(consumerGroup)+"-demo-payments", log); err != nil {
				log.Error("demo payments stopped", "err", err)
			}
		})
	}
	streams := newStreamLimits(maxStreams, cfg.StreamsPerUser, cfg.StreamLifetime)
	p.srv = newServer(log, db, producer, notes, orders, streams, m, gauges{
		database:   func(ctx context.Context) (databaseGauges, error) { return getDatabaseGauges(ctx, db, floor.get()) },
		orderQueue: orders.waiting, streams: streams.gauges, conns: conns.gauges,
		consumerLag: func(ctx context.Context) (map[int32]int64, error) {
			return consumerLag(ctx, producer, cfg.topic(consumerGroup), cfg.topic(topicPaymentResults))
		},
	})
	return p
}

// shutdown stops the program by stopBy: stop taking requests and finish
// those in flight; let the relay finish its batch and the consumer commit
// what it applied; leave the group; flush the producer. All of it within
// SHUTDOWN_TIMEOUT, whatever the broker or the group do: the last fifth of
// the budget (at most 2s) is kept for leaving the group, and work still in
// flight when it begins is abandoned. That is safe to redo: unpublished rows
// stay in the outbox, uncommitted results are redelivered and change nothing.
func (p *program) shutdown(stopBy time.Time) {
	p.log.Info("shutting down")
	defer p.stopWork()
	defer p.abort()
	ctx, cancel := context.WithDeadline(context.Background(), stopBy)
	defer cancel()
	keep := min(p.cfg.ShutdownTimeout/5, 2*time.Second)
	defer time.AfterFunc(time.Until(stopBy)-keep, p.abort).Stop()
	if err := p.srv.Shutdown(ctx); err != nil {
		p.log.Warn("http shutdown", "err", err)
	}
	p.stopWork()
	done := make(chan struct{})
	go func() {
		defer close(done)
		p.workers.Wait() // the relay's last batch is marked, the consumer's last poll committed
		if err := p.group.LeaveGroupContext(ctx); err != nil {
			p.log.Warn("leave consumer group", "err", err)
		}
		p.group.CloseAllowingRebalance()
		if err := p.producer.Flush(ctx); err != nil {
			p.log.Warn("flush producer", "err", err)
		}
	}()
	select {
	case <-done:
		p.log.Info("stopped")
	case <-ctx.Done():
		p.log.Error("shutdown budget spent, stopping anyway: unpublished events stay in the outbox, "+
			"uncommitted payment results will be redelivered", "budget", p.cfg.ShutdownTimeout)
	}
}

// closeBefore runs f, a deferred close, but waits for it no later than
// *deadline once that is set: shutdown ends within its budget even when a
// close hangs (a pool waiting for a connection an abandoned worker holds).
func closeBefore(deadline *time.Time, f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	if deadline.IsZero() {
		<-done
		return
	}
	select {
	case <-done:
	case <-time.After(time.Until(*deadline)):
	}
}
