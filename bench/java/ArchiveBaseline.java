// The "physical limit" baselines of the benchmark (bench/java_baseline.py builds and runs this file):
// RabbitMQ's own Java client (Debian's librabbitmq-client-java) draining a backlog and publishing with
// confirms, doing the same work as bench/baseline.py's aio-pika consumer and publisher.
//
//   consume <amqp-uri> <queue> <count> <prefetch> <ack-every>
//   publish <amqp-uri> <exchange-or-empty> <routing-key> <count> <body-size> <in-flight>
//
// Each prints one JSON line on stdout: {"messages": N, "seconds": S, "msg_per_s": R, ...}; errors go to
// stderr with a non-zero exit status.

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.ConfirmListener;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.DefaultConsumer;
import com.rabbitmq.client.Envelope;
import java.util.HashMap;
import java.util.Locale;
import java.util.Map;
import java.util.Random;
import java.util.concurrent.ConcurrentNavigableMap;
import java.util.concurrent.ConcurrentSkipListMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.Semaphore;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;

public final class ArchiveBaseline {
    private ArchiveBaseline() {}

    public static void main(String[] args) throws Exception {
        if (args.length == 6 && args[0].equals("consume")) {
            consume(args[1], args[2], Integer.parseInt(args[3]), Integer.parseInt(args[4]),
                    Integer.parseInt(args[5]));
        } else if (args.length == 7 && args[0].equals("publish")) {
            publish(args[1], args[2], args[3], Integer.parseInt(args[4]), Integer.parseInt(args[5]),
                    Integer.parseInt(args[6]));
        } else {
            System.err.println("usage: ArchiveBaseline consume <amqp-uri> <queue> <count> <prefetch> <ack-every>");
            System.err.println("       ArchiveBaseline publish <amqp-uri> <exchange-or-empty> <routing-key> "
                    + "<count> <body-size> <in-flight>");
            System.exit(2);
        }
    }

    private static Connection connect(String uri) throws Exception {
        ConnectionFactory factory = new ConnectionFactory();
        factory.setUri(uri);
        factory.setAutomaticRecoveryEnabled(false); // a lost connection ends the measurement
        return factory.newConnection("rabbit-archive bench (java)");
    }

    /** Drain `count` deliveries with manual acks, multiple=true every `ackEvery` and at the end. */
    private static void consume(String uri, String queue, int count, int prefetch, int ackEvery)
            throws Exception {
        CountDownLatch done = new CountDownLatch(1);
        long[] times = new long[2]; // first and last delivery, System.nanoTime()
        try (Connection connection = connect(uri)) {
            Channel channel = connection.createChannel();
            channel.basicQos(prefetch);
            DefaultConsumer consumer = new DefaultConsumer(channel) {
                private int received;

                @Override
                public void handleDelivery(String tag, Envelope envelope, AMQP.BasicProperties properties,
                                           byte[] body) throws java.io.IOException {
                    // One thread per channel delivers in order: no locking needed for the count.
                    if (received >= count) {
                        return; // more than asked for: left unacked, requeued when the channel closes
                    }
                    received += 1;
                    if (received == 1) {
                        times[0] = System.nanoTime();
                    }
                    if (received % ackEvery == 0 || received == count) {
                        getChannel().basicAck(envelope.getDeliveryTag(), true);
                    }
                    if (received == count) {
                        times[1] = System.nanoTime();
                        done.countDown();
                    }
                }
            };
            String tag = channel.basicConsume(queue, false, consumer);
            while (!done.await(1, TimeUnit.SECONDS)) {
                if (!channel.isOpen()) {
                    throw new IllegalStateException("channel closed: " + channel.getCloseReason());
                }
            }
            channel.basicCancel(tag);
        }
        double seconds = (times[1] - times[0]) / 1e9;
        // As bench/baseline.py: count - 1 intervals between the first delivery and the last.
        double rate = count > 1 && seconds > 0 ? (count - 1) / seconds : 0.0;
        System.out.println(String.format(Locale.ROOT,
                "{\"messages\": %d, \"seconds\": %.6f, \"msg_per_s\": %.3f}", count, seconds, rate));
    }

    /** Publish `count` persistent messages with confirms, at most `inFlight` unconfirmed. */
    private static void publish(String uri, String exchange, String routingKey, int count, int bodySize,
                                int inFlight) throws Exception {
        byte[] body = new byte[bodySize];
        new Random(bodySize).nextBytes(body);
        Semaphore window = new Semaphore(inFlight);
        // Unconfirmed publish sequence numbers; confirms arrive on the connection's thread.
        ConcurrentNavigableMap<Long, Boolean> unconfirmed = new ConcurrentSkipListMap<>();
        AtomicLong nacked = new AtomicLong();
        long started;
        long ended;
        try (Connection connection = connect(uri)) {
            Channel channel = connection.createChannel();
            channel.confirmSelect();
            channel.addConfirmListener(new ConfirmListener() {
                @Override
                public void handleAck(long deliveryTag, boolean multiple) {
                    settle(deliveryTag, multiple);
                }

                @Override
                public void handleNack(long deliveryTag, boolean multiple) {
                    nacked.addAndGet(settle(deliveryTag, multiple));
                }

                private int settle(long deliveryTag, boolean multiple) {
                    int settled = 0;
                    if (multiple) {
                        // Every sequence number up to deliveryTag, each counted once.
                        ConcurrentNavigableMap<Long, Boolean> upTo = unconfirmed.headMap(deliveryTag, true);
                        while (upTo.pollFirstEntry() != null) {
                            settled += 1;
                        }
                    } else if (unconfirmed.remove(deliveryTag) != null) {
                        settled = 1;
                    }
                    window.release(settled);
                    return settled;
                }
            });
            started = System.nanoTime();
            for (int index = 0; index < count; index++) {
                acquire(window, 1, channel);
                Map<String, Object> headers = new HashMap<>();
                headers.put("seq", index);
                headers.put("source", "bench");
                headers.put("tenant", "t-" + (index % 7));
                AMQP.BasicProperties properties = new AMQP.BasicProperties.Builder()
                        .messageId("m-" + index)
                        .headers(headers)
                        .deliveryMode(2)
                        .build();
                // Registered before the publish: its confirm may arrive before basicPublish returns.
                unconfirmed.put(channel.getNextPublishSeqNo(), Boolean.TRUE);
                channel.basicPublish(exchange, routingKey, properties, body);
            }
            acquire(window, inFlight, channel); // every permit back: the last confirm has arrived
            ended = System.nanoTime();
        }
        double seconds = (ended - started) / 1e9;
        double rate = seconds > 0 ? count / seconds : 0.0;
        System.out.println(String.format(Locale.ROOT,
                "{\"messages\": %d, \"seconds\": %.6f, \"msg_per_s\": %.3f, \"nacked\": %d, \"in_flight\": %d}",
                count, seconds, rate, nacked.get(), inFlight));
    }

    private static void acquire(Semaphore window, int permits, Channel channel) throws InterruptedException {
        while (!window.tryAcquire(permits, 1, TimeUnit.SECONDS)) {
            if (!channel.isOpen()) {
                throw new IllegalStateException("channel closed: " + channel.getCloseReason());
            }
        }
    }
}
