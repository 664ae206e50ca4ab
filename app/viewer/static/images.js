// Pixels in the browser: decoding uploads and answers, drawing masks.

const EXACT = { colorSpaceConversion: "none", premultiplyAlpha: "none" };

/** The upload as an ImageBitmap when the browser can decode it (PNG, JPEG, BMP), else null (TIFF, DICOM). */
export async function decodeInBrowser(file) {
  try {
    return await createImageBitmap(file); // EXIF orientation applied, as the service does
  } catch {
    return null;
  }
}

/** The RGBA pixels of an image blob (a PNG answer of the service), undistorted by colour management. */
export async function pixelsOf(blob) {
  const bitmap = await createImageBitmap(blob, EXACT);
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  return context.getImageData(0, 0, canvas.width, canvas.height);
}

/**
 * Class indices (one byte per pixel) from the service's mask PNG: 0/255 for a binary model (two classes),
 * the class index otherwise.
 */
export function labelsOf(maskPixels, classCount) {
  const { data, width, height } = maskPixels;
  const labels = new Uint8Array(width * height);
  const binary = classCount === 2;
  for (let i = 0, p = 0; i < labels.length; i += 1, p += 4) {
    const value = data[p];
    labels[i] = binary ? (value > 0 ? 1 : 0) : value;
  }
  return labels;
}

/** The colour (RGB) of class `index` >= 1, as the service's overlays draw it. */
export function classColour(config, index) {
  const colours = config.overlayColours;
  return colours[(index - 1) % colours.length];
}

/**
 * The image the service read, recovered from its `format=overlay` answer: where the mask has a class the
 * overlay is (1 - alpha) * image + alpha * colour, so the image is (overlay - alpha * colour) / (1 - alpha);
 * elsewhere the overlay is the image. Used when the browser cannot decode the upload (TIFF, DICOM).
 */
export function imageFromOverlay(overlayPixels, labels, config) {
  const { data, width, height } = overlayPixels;
  const out = new ImageData(width, height);
  const alpha = config.overlayAlpha;
  for (let i = 0, p = 0; i < labels.length; i += 1, p += 4) {
    const label = labels[i];
    if (label === 0) {
      out.data[p] = data[p];
      out.data[p + 1] = data[p + 1];
      out.data[p + 2] = data[p + 2];
    } else {
      const colour = classColour(config, label);
      for (let c = 0; c < 3; c += 1) {
        out.data[p + c] = Math.round((data[p + c] - alpha * colour[c]) / (1 - alpha));
      }
    }
    out.data[p + 3] = 255;
  }
  return out;
}

/**
 * Draws the classes of `labels` that are in `visible` (a Set of indices) onto `canvas`, each in its colour,
 * fully opaque; everything else transparent (the canvas's CSS opacity is the user's opacity).
 */
export function drawMask(canvas, labels, width, height, visible, config) {
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  const colours = new Map();
  for (const index of visible) if (index > 0) colours.set(index, classColour(config, index));
  for (let i = 0, p = 0; i < labels.length; i += 1, p += 4) {
    const colour = colours.get(labels[i]);
    if (colour !== undefined) {
      image.data[p] = colour[0];
      image.data[p + 1] = colour[1];
      image.data[p + 2] = colour[2];
      image.data[p + 3] = 255;
    }
  }
  context.putImageData(image, 0, 0);
}

/** Draws a bitmap or ImageData at its own size onto `canvas`. */
export function drawImage(canvas, source) {
  canvas.width = source.width;
  canvas.height = source.height;
  const context = canvas.getContext("2d");
  if (source instanceof ImageData) context.putImageData(source, 0, 0);
  else context.drawImage(source, 0, 0);
}
